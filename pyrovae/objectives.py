"""Training objectives as loss modules: ``loss(x)`` is the negative ELBO summed over the batch.

One training loop trains any of them (``pyrovae.engine.fit``), each called as ``loss(x, kl_weight=beta)``: Pyro's estimators around a VAE's
model/guide pair, and the hand-coded ELBO of :mod:`pyrovae.elbo_manual`.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyrovae.elbo_manual import ManualELBO, ManualIWAE

__all__ = ["OBJECTIVES", "PyroELBO", "PyroIWAE", "build_objective"]


class PyroELBO(nn.Module):
    """-ELBO of ``vae.model``/``vae.guide`` by a Pyro estimator (``Trace_ELBO`` by default).

    The module owns the VAE, so ``loss.parameters()`` are exactly the VAE's parameters.
    """

    def __init__(self, vae: nn.Module, elbo: ELBO | None = None):
        super().__init__()
        self.vae = vae
        self.elbo = elbo if elbo is not None else Trace_ELBO()
        # bound once: `vae.model` is a new object at every access, and Pyro's JIT caches by identity
        self._model, self._guide = vae.model, vae.guide

    def forward(self, x: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        return self.elbo.differentiable_loss(self._model, self._guide, x, kl_weight=kl_weight)


class PyroIWAE(nn.Module):
    """-IWAE_K summed over the batch, from Pyro traces of ``vae.model``/``vae.guide``.

    The guide runs inside a plate of K particles (dim -2, outside the data plate), the model is
    replayed against it, and the per-image log weights log p(x, z_k) - log q(z_k|x) of each particle
    are averaged in probability space. (Pyro's ``RenyiELBO(alpha=0)`` estimates the same bound but
    has no differentiable loss to hand to a torch optimizer.)
    """

    def __init__(self, vae: nn.Module, particles: int = 5):
        super().__init__()
        if not isinstance(particles, int) or particles < 1:
            raise ValueError(f"the IWAE bound needs K >= 1 particles, got {particles!r}")
        self.vae, self.particles = vae, particles
        self._model, self._guide = vae.model, vae.guide

    def _vectorized(self, fn):
        def run(x, kl_weight):
            with pyro.plate("particles", self.particles, dim=-2):
                return fn(x, kl_weight=kl_weight)
        return run

    def forward(self, x: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        guide_trace = poutine.trace(self._vectorized(self._guide)).get_trace(x, kl_weight)
        model_trace = poutine.trace(poutine.replay(self._vectorized(self._model), trace=guide_trace)).get_trace(
            x, kl_weight)
        log_w = 0.0
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            trace.compute_log_prob()
            for site in trace.nodes.values():
                if site["type"] == "sample" and not site_is_subsample(site):
                    log_w = log_w + sign * site["log_prob"]  # (K, batch)
        return -(torch.logsumexp(log_w, 0) - math.log(self.particles)).sum()


#: Objectives by config name: a factory taking the VAE and ``particles`` (K, for the IWAE bounds).
OBJECTIVES = {
    "trace_elbo": lambda vae, particles=1: PyroELBO(vae, Trace_ELBO()),
    "meanfield_elbo": lambda vae, particles=1: PyroELBO(vae, TraceMeanField_ELBO()),
    "manual_analytic": lambda vae, particles=1: ManualELBO(vae, kl="analytic"),
    "manual_mc": lambda vae, particles=1: ManualELBO(vae, kl="mc"),
    "iwae": lambda vae, particles=1: PyroIWAE(vae, particles),
    "manual_iwae": lambda vae, particles=1: ManualIWAE(vae, particles),
}


def build_objective(name: str, vae: nn.Module, particles: int = 1) -> nn.Module:
    return OBJECTIVES[name](vae, particles)
