"""Likelihoods p(x|z): they turn decoder outputs into a distribution over images.

A likelihood declares ``outputs_per_pixel``: the decoder produces ``outputs_per_pixel * C`` channels
for images of C channels, and ``forward(outputs)`` returns a distribution whose event shape is the
image shape (C, H, W). ``check(x)`` rejects data outside the support with an error that says what to
do instead; ``mean(outputs)`` gives E[x|z] for pictures.

To add a likelihood: subclass :class:`Likelihood`, implement those, and add it to ``LIKELIHOODS``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

__all__ = ["LIKELIHOODS", "Likelihood", "BernoulliLikelihood", "DataSupportError"]


class DataSupportError(ValueError):
    """The data lies outside the support of the likelihood."""


class Likelihood(nn.Module):
    """Base class. ``data_kind`` says what the data must be: "binary", "unit" ([0, 1]) or "8bit"."""

    outputs_per_pixel: int = 1
    data_kind: str = "unit"

    @classmethod
    def build(cls, image_shape: tuple[int, ...], **options) -> "Likelihood":
        return cls(**options)

    def check(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def mean(self, outputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class BernoulliLikelihood(Likelihood):
    """x_i ~ Bernoulli(sigmoid(logit_i)) independently per pixel, for binary images."""

    outputs_per_pixel = 1
    data_kind = "binary"

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        # logits: (batch, C, H, W); the three image dims are one event
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(logits.dim() - 1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def check(self, x: torch.Tensor) -> None:
        if not bool(((x == 0) | (x == 1)).all()):
            bad = x[(x != 0) & (x != 1)]
            raise DataSupportError(
                "the Bernoulli likelihood needs binary data (every pixel 0 or 1), but got values "
                f"such as {bad[:3].tolist()} (range {x.min().item():.3g} to {x.max().item():.3g}). "
                "Binarize grey levels first, e.g. x = torch.bernoulli(x) for a dynamic "
                "binarization, or (x > 0.5).float() for a fixed threshold; or use a likelihood for "
                "grey levels such as the continuous Bernoulli."
            )


#: Likelihoods by config name.
LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": BernoulliLikelihood,
}
