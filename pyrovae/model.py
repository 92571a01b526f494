"""The variational autoencoder as a pair of Pyro programs: ``model`` (p) and ``guide`` (q).

Generative story (Kingma and Welling 2014), for each image n in the data plate::

    z_n ~ p(z)                          the prior, event shape (z_dim,)
    x_n ~ p(x | decoder(z_n))           the likelihood, event shape (C, H, W)

Inference (the amortized guide)::

    z_n ~ q(z | x_n) = N(mu(x_n), diag(sigma(x_n)^2))

``VAE.model`` and ``VAE.guide`` share one signature and work with stock Pyro
(``SVI``, ``Predictive``, ``poutine.trace``); ``vae.model(batch_size=n)`` runs generatively.
The parameters belong to the ``VAE`` module and a torch optimizer trains them. Run under Pyro's
default settings, a ``PyroModule`` also enters its parameters into Pyro's global parameter store,
each instance under its own unique name, so two models in one process never share parameters.
``pyrovae.runs.train_run`` trains under ``pyro.settings.context(module_local_params=True)``, which
keeps the store empty.
"""

from __future__ import annotations

import contextlib
import itertools

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule, pyro_method
from pyro.poutine.util import is_validation_enabled
from torch import nn


__all__ = ["VAE", "ImageShapeError"]

_instance_ids = itertools.count()


class ImageShapeError(ValueError):
    """The images do not have the shape the networks were built for."""


class VAE(PyroModule):
    """A VAE built from swappable parts: ``prior``, ``decoder`` + ``likelihood``, and ``posterior``.

    Args:
        prior: module whose ``forward()`` returns p(z) with event shape (z_dim,).
        decoder: network z -> raw outputs of shape (batch, *image_shape).
        likelihood: module mapping decoder outputs to p(x|z); has ``check(x)``.
        posterior: module mapping x to q(z|x) with event shape (z_dim,).
        image_shape: (C, H, W) of one image.
    """

    def __init__(self, prior: nn.Module, decoder: nn.Module, likelihood: nn.Module, posterior: nn.Module,
                 image_shape: tuple[int, ...]):
        # a unique Pyro name keeps parameter-store entries of two instances apart
        super().__init__(name=f"vae{next(_instance_ids)}")
        self.prior = prior
        self.decoder = decoder
        self.likelihood = likelihood
        self.posterior = posterior
        self.image_shape = tuple(image_shape)

    def check_data(self, x: torch.Tensor) -> None:
        """Raise a clear error if ``x`` is not a batch of images the model can score."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ImageShapeError(
                f"expected a batch of images of shape (batch, {', '.join(map(str, self.image_shape))}), "
                f"got a tensor of shape {tuple(x.shape)}. Reshape the data, e.g. x.view(-1, "
                f"{', '.join(map(str, self.image_shape))}), or build the model for this image shape."
            )
        self.likelihood.check(x)

    @pyro_method
    def model(self, x: torch.Tensor | None = None, kl_weight: float = 1.0, batch_size: int | None = None
              ) -> torch.Tensor:
        """p(x, z) = p(z) p(x|z); ``x`` of shape (batch, C, H, W) is observed.

        Without ``x`` the model runs generatively: it draws ``batch_size`` (default 1) codes from the
        prior and images from the likelihood, as ``pyro.infer.Predictive`` expects.
        ``kl_weight`` (beta) scales log p(z) here and log q(z|x) in the guide, hence the KL term
        (beta-VAE, KL warm-up); Pyro hands model and guide the same arguments.
        """
        with pyro.plate("data", self._batch(x, batch_size)):
            with _kl_scale(kl_weight):
                z = pyro.sample("z", self.prior())  # (batch, z_dim)
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)  # (batch, C, H, W)
        return z

    @pyro_method
    def guide(self, x: torch.Tensor, kl_weight: float = 1.0, batch_size: int | None = None) -> torch.Tensor:
        """q(z|x), amortized by the encoder. (``batch_size`` only mirrors the model's signature.)"""
        self._check_guide_input(x)
        with pyro.plate("data", x.shape[0]), _kl_scale(kl_weight):
            return pyro.sample("z", self.posterior(x))  # (batch, z_dim)

    def _batch(self, x: torch.Tensor | None, batch_size: int | None) -> int:
        """The model's data-plate size: the images given (checked while Pyro's validation is on, as it
        is by default; the training loop turns it off) or ``batch_size`` draws (default 1)."""
        if x is not None and is_validation_enabled():
            self.check_data(x)
        if x is not None and batch_size is not None and batch_size != x.shape[0]:
            raise ValueError(f"batch_size={batch_size} does not match the {x.shape[0]} images given; give one of them")
        return x.shape[0] if x is not None else (1 if batch_size is None else batch_size)

    def _check_guide_input(self, x: torch.Tensor | None) -> None:
        if x is None:
            raise ValueError("the guide q(z|x) needs images x; to draw from the prior run vae.model(batch_size=n) "
                             "without a guide")
        if is_validation_enabled():
            self.check_data(x)

    # --- conveniences for pictures and evaluation (no Pyro machinery) ---------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of q(z|x): (batch, z_dim)."""
        return self.posterior.location(x)

    def outputs(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's raw outputs for a code z, what the likelihood reads: (batch, C', H, W)."""
        return self.decoder(z)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z]: (batch, C, H, W)."""
        return self.likelihood.mean(self.outputs(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """E[x|z] for n codes z ~ p(z): (n, C, H, W)."""
        return self.decode(self.prior().sample((n,)))


def _kl_scale(kl_weight):
    """Scale the latent site by ``kl_weight`` (in model and guide alike), or leave it alone at 1. A
    tensor weight (a static buffer of a replayed step) always scales: no branch on a device value."""
    if isinstance(kl_weight, torch.Tensor) or kl_weight != 1.0:
        return poutine.scale(scale=kl_weight)
    return contextlib.nullcontext()
