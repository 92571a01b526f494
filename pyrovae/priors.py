"""Priors p(z). Each is a module whose ``forward()`` returns a distribution with event shape (z_dim,).

Parameters (learned or fixed) are owned by the module, as buffers or ``nn.Parameter``s, so they move
to the training device, train with everything else and are saved in checkpoints.

To add a prior: subclass :class:`Prior`, take ``z_dim`` (and any options) in ``__init__``, return
p(z) from ``forward()``, and add the class to ``PRIORS``. A prior that needs more of the VAE (the
VampPrior needs the guide) overrides ``build``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

__all__ = ["PRIORS", "Prior", "StandardNormalPrior"]


class Prior(nn.Module):
    """Base class: ``forward()`` -> p(z) with event shape (z_dim,)."""

    @classmethod
    def build(cls, z_dim: int, *, guide_net: nn.Module, image_shape: tuple[int, ...], **options) -> "Prior":
        """Construct from a config; ``guide_net`` and ``image_shape`` are there for priors that need them."""
        return cls(z_dim, **options)


class StandardNormalPrior(Prior):
    """p(z) = N(0, I): the prior of Kingma and Welling (2014)."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


#: Priors by config name.
PRIORS: dict[str, type[Prior]] = {
    "normal": StandardNormalPrior,
}
