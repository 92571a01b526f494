"""Amortized approximate posteriors q(z|x), the variational families: an encoder network produces the
parameters for each x. ``VAE.guide``, the Pyro program, samples z from one of them. 

A posterior module wraps an encoder (x -> (loc, scale), each (batch, z_dim)) and returns q(z|x) from
``forward(x)`` with batch shape (batch,) and event shape (z_dim,). To add one: subclass
:class:`Posterior` and add it to ``POSTERIORS``; check every option in ``__init__`` (see
:mod:`pyrovae.priors`).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import affine_autoregressive
from torch import nn

from pyrovae.options import OptionError, option_widths

__all__ = ["POSTERIORS", "Posterior", "DiagonalNormalPosterior", "IAFPosterior"]


class Posterior(nn.Module):
    """Base class: ``forward(x)`` -> q(z|x)."""

    @classmethod
    def build(cls, encoder: nn.Module, z_dim: int, **options) -> "Posterior":
        return cls(encoder, **options)

    def location(self, x: torch.Tensor) -> torch.Tensor:
        """A representative code for each x (the encoder's mean): (batch, z_dim)."""
        return self.encoder(x)[0]


class DiagonalNormalPosterior(Posterior):
    """q(z|x) = N(z; mu(x), diag(sigma(x)^2)), with mu and sigma from one encoder network."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.encoder(x)  # (batch, z_dim) each
        return dist.Normal(loc, scale, validate_args=False).to_event(1)


class IAFPosterior(Posterior):
    """q(z|x): the diagonal Gaussian of the encoder followed by inverse autoregressive flows.

    Kingma et al. (2016)::

        z_0 ~ N(mu(x), diag(sigma(x)^2))
        z_t = s_t(z_{t-1}) * z_{t-1} + (1 - s_t(z_{t-1})) * m_t(z_{t-1}),   t = 1..flows
        log q(z_T|x) = log N(z_0) - sum_t sum_j log s_tj

    with m_t and s_t = sigmoid(.) from a masked autoregressive network (Pyro's ``AffineAutoregressive``
    in its numerically stable form, Eq. 14 of the paper). Drawing z is one pass per flow, and the
    log-density of a drawn z reuses the values cached while drawing it. The flows are shared by all x
    (they take no context from the encoder); each flow draws its own order of the coordinates, saved
    in the checkpoint.

    Args:
        flows: the number of autoregressive flows.
        hidden: hidden widths of each flow's autoregressive network, each at least ``z_dim``; ``None``:
            Pyro's default, one layer of ``3 * z_dim + 1``.
    """

    def __init__(self, encoder: nn.Module, z_dim: int, flows: int = 2, hidden: tuple[int, ...] | None = None):
        super().__init__()
        if isinstance(flows, bool) or not isinstance(flows, int) or flows < 1:
            raise OptionError("flows", f"must be a positive integer, the number of flows (e.g. 2): an IAF posterior "
                                       f"needs at least one flow, got flows={flows!r}")
        widths = option_widths("hidden", hidden, low=z_dim, meaning="the autoregressive networks need a unit for "
                                                                    "each latent coordinate")
        self.encoder = encoder
        widths = list(widths) if widths is not None else None
        self.flows = nn.ModuleList(
            affine_autoregressive(z_dim, hidden_dims=widths, stable=True) for _ in range(flows))

    @classmethod
    def build(cls, encoder: nn.Module, z_dim: int, **options) -> "IAFPosterior":
        return cls(encoder, z_dim, **options)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.encoder(x)  # (batch, z_dim) each
        base = dist.Normal(loc, scale, validate_args=False).to_event(1)
        return dist.TransformedDistribution(base, list(self.flows))

    def location(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's mean carried through the flows: (batch, z_dim)."""
        z = self.encoder(x)[0]
        for flow in self.flows:
            z = flow(z)
        return z


#: Guides by config name.
POSTERIORS: dict[str, type[Posterior]] = {
    "diagonal": DiagonalNormalPosterior,
    "iaf": IAFPosterior,
}
