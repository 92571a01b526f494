"""Amortized variational families q(z|x): an encoder network produces the parameters for each x.

A guide module wraps an encoder (x -> (loc, scale), each (batch, z_dim)) and returns q(z|x) from
``forward(x)`` with batch shape (batch,) and event shape (z_dim,). To add one: subclass
:class:`Guide` and add it to ``GUIDES``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

__all__ = ["GUIDES", "Guide", "DiagonalNormalGuide"]


class Guide(nn.Module):
    """Base class: ``forward(x)`` -> q(z|x)."""

    @classmethod
    def build(cls, encoder: nn.Module, z_dim: int, **options) -> "Guide":
        return cls(encoder, **options)

    def location(self, x: torch.Tensor) -> torch.Tensor:
        """A representative code for each x (the encoder's mean): (batch, z_dim)."""
        return self.encoder(x)[0]


class DiagonalNormalGuide(Guide):
    """q(z|x) = N(z; mu(x), diag(sigma(x)^2)), with mu and sigma from one encoder network."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.encoder(x)  # (batch, z_dim) each
        return dist.Normal(loc, scale, validate_args=False).to_event(1)


#: Guides by config name.
GUIDES: dict[str, type[Guide]] = {
    "diagonal": DiagonalNormalGuide,
}
