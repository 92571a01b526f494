"""The ELBO written out in plain PyTorch, to be read beside Pyro's ``Trace_ELBO``.

For one image x, with the encoder's q(z|x), the prior p(z) and the decoder's p(x|z)::

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))  <=  log p(x)

Both expectations are estimated from one reparameterized draw z = mu(x) + sigma(x) * eps,
eps ~ N(0, I), so gradients flow through z into the encoder. No ``pyro.infer``, no poutine: the same
networks, prior and likelihood modules as the Pyro model, called directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import kl_divergence

__all__ = ["ManualELBO", "ManualIWAE", "has_analytic_kl"]


def has_analytic_kl(q, p) -> bool:
    """Whether torch knows KL(q || p) in closed form for these two distributions."""
    try:
        kl_divergence(q, p)
    except NotImplementedError:
        return False
    return True


class ManualELBO(nn.Module):
    """-ELBO summed over the batch; ``kl="analytic"`` (closed form where it exists) or ``"mc"``.

    With ``kl="mc"`` it is the estimator of Pyro's ``Trace_ELBO``; with ``kl="analytic"`` that of
    ``TraceMeanField_ELBO``, which falls back to Monte Carlo where no closed form exists.
    """

    def __init__(self, vae: nn.Module, kl: str = "analytic"):
        super().__init__()
        if kl not in ("analytic", "mc"):
            raise ValueError(f"kl must be 'analytic' or 'mc', got {kl!r}")
        self.vae = vae
        self.kl = kl

    def forward(self, x: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        if hasattr(self.vae, "stack_terms"):
            return self._stack(x, kl_weight)
        q = self.vae.posterior(x)  # q(z|x), batch (batch,), event (z_dim,)
        z = q.rsample()  # reparameterization: z = mu + sigma * eps, (batch, z_dim)
        p = self.vae.prior().expand(q.batch_shape)  # p(z), one copy per image like Pyro's plate
        log_px_z = self.vae.likelihood(self.vae.decoder(z)).log_prob(x)  # log p(x|z), (batch,)
        if self.kl == "analytic" and has_analytic_kl(q, p):
            kl = kl_divergence(q, p)  # closed form, e.g. Gaussian to Gaussian, (batch,)
        else:
            log_pz = p.log_prob(z)  # scored before q, in the order Pyro's trace does: same rounding
            kl = q.log_prob(z) - log_pz  # one-sample estimate of KL, (batch,)
        return -(log_px_z - kl_weight * kl).sum()  # -ELBO (beta-weighted KL), summed like Pyro's losses

    def _stack(self, x: torch.Tensor, kl_weight) -> torch.Tensor:
        """The same for a stack of layers (:class:`pyrovae.hierarchy.HierarchicalVAE`): one KL term per
        layer, in closed form where it exists and where the guide drew the layer's parent before it
        (the top-down guide; under the bottom-up one only the top layer's)."""
        terms = self.vae.stack_terms(x)  # {site: (z, q, p)}, top layer first
        top_down = self.vae.inference != "bottom_up"
        kl = 0.0
        for i, (z, q, p) in enumerate(terms["layers"].values()):
            p = p.expand(q.batch_shape)
            if self.kl == "analytic" and (top_down or i == 0) and has_analytic_kl(q, p):
                kl = kl + kl_divergence(q, p)  # (batch,)
            else:
                kl = kl + (q.log_prob(z) - p.log_prob(z))
        return -(terms["reconstruction"] - kl_weight * kl).sum()


class ManualIWAE(nn.Module):
    """-IWAE_K summed over the batch (Burda et al. 2015), in plain PyTorch.

    log p(x) >= E[log (1/K) sum_k w_k],  w_k = p(x|z_k) p(z_k) / q(z_k|x),  z_k ~ q(z|x) independently;
    K = 1 is the ELBO, and the bound tightens as K grows.
    """

    def __init__(self, vae: nn.Module, particles: int = 5):
        super().__init__()
        if not isinstance(particles, int) or particles < 1:
            raise ValueError(f"the IWAE bound needs K >= 1 particles, got {particles!r}")
        self.vae = vae
        self.particles = particles

    def forward(self, x: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        if hasattr(self.vae, "log_weights"):  # a stack of layers: log w summed over them, (K, batch)
            log_w = self.vae.log_weights(x, self.particles, kl_weight)
            return -(torch.logsumexp(log_w, 0) - math.log(self.particles)).sum()
        q = self.vae.posterior(x)  # q(z|x), batch (batch,)
        z = q.rsample((self.particles,))  # (K, batch, z_dim), reparameterized
        log_px_z = self.vae.likelihood(self.vae.decoder(z)).log_prob(x)  # (K, batch)
        # log importance weights, (K, batch); beta scales log p(z) and log q(z|x) as Pyro's poutine.scale does
        log_w = log_px_z + kl_weight * self.vae.prior().log_prob(z) - kl_weight * q.log_prob(z)
        return -(torch.logsumexp(log_w, 0) - math.log(self.particles)).sum()
