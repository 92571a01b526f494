"""Likelihoods p(x|z): they turn decoder outputs into a distribution over images.

Each likelihood declares ``outputs_per_pixel`` (how many decoder outputs it consumes per pixel) and
``check(x)``, which rejects data outside its support with an error saying what to do instead.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

__all__ = ["LIKELIHOODS", "BernoulliLikelihood", "DataSupportError"]


class DataSupportError(ValueError):
    """The data lies outside the support of the likelihood."""


class BernoulliLikelihood(nn.Module):
    """x_i ~ Bernoulli(sigmoid(logit_i)) independently per pixel, for binary images."""

    outputs_per_pixel = 1

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        # logits: (batch, C, H, W); the three image dims are one event
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(logits.dim() - 1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """E[x|z], in [0, 1], for pictures."""
        return torch.sigmoid(logits)

    def check(self, x: torch.Tensor) -> None:
        if not bool(((x == 0) | (x == 1)).all()):
            bad = x[(x != 0) & (x != 1)]
            raise DataSupportError(
                "the Bernoulli likelihood needs binary data (every pixel 0 or 1), but got values "
                f"such as {bad[:3].tolist()} (range {x.min().item():.3g} to {x.max().item():.3g}). "
                "Binarize grey levels first, e.g. x = torch.bernoulli(x) for a dynamic "
                "binarization, or (x > 0.5).float() for a fixed threshold."
            )


#: Likelihoods by config name.
LIKELIHOODS: dict[str, type[nn.Module]] = {
    "bernoulli": BernoulliLikelihood,
}
