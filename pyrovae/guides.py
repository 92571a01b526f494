"""Amortized variational families q(z|x): an encoder network produces the parameters for each x."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

__all__ = ["GUIDES", "DiagonalNormalGuide"]


class DiagonalNormalGuide(nn.Module):
    """q(z|x) = N(z; mu(x), diag(sigma(x)^2)), with mu and sigma from one encoder network."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.encoder(x)  # (batch, z_dim) each
        return dist.Normal(loc, scale, validate_args=False).to_event(1)


#: Guides by config name. A guide class wraps an encoder and returns q(z|x) from ``forward(x)``.
GUIDES: dict[str, type[nn.Module]] = {
    "diagonal": DiagonalNormalGuide,
}
