"""Training objectives as loss modules: ``loss(x)`` is the negative ELBO summed over the batch.

One training loop trains any of them (``pyrovae.train.train_epoch``): Pyro's estimators around a VAE's
model/guide pair, and the hand-coded ELBO of :mod:`pyrovae.elbo_manual`.
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyrovae.elbo_manual import ManualELBO

__all__ = ["OBJECTIVES", "PyroELBO", "build_objective"]


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.elbo.differentiable_loss(self._model, self._guide, x)


#: Objectives by config name: a factory taking the VAE.
OBJECTIVES = {
    "trace_elbo": lambda vae: PyroELBO(vae, Trace_ELBO()),
    "meanfield_elbo": lambda vae: PyroELBO(vae, TraceMeanField_ELBO()),
    "manual_analytic": lambda vae: ManualELBO(vae, kl="analytic"),
    "manual_mc": lambda vae: ManualELBO(vae, kl="mc"),
}


def build_objective(name: str, vae: nn.Module) -> nn.Module:
    return OBJECTIVES[name](vae)
