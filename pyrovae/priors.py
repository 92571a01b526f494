"""Priors p(z). Each is a module whose ``forward()`` returns a distribution with event shape (z_dim,).

Parameters (learned or fixed) are owned by the module, as buffers or ``nn.Parameter``s, so they move
to the training device and are saved in checkpoints with the rest of the model.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

__all__ = ["PRIORS", "StandardNormalPrior"]


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I): the prior of Kingma and Welling (2014)."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


#: Priors by config name. A prior class takes ``z_dim`` and returns p(z) from ``forward()``.
PRIORS: dict[str, type[nn.Module]] = {
    "normal": StandardNormalPrior,
}
