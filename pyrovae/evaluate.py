"""Test-set figures, per image in nats, computed with plain torch from the VAE's parts.

The -ELBO here is the same single-sample estimator as Pyro's ``Trace_ELBO``
(log p(x|z) + log p(z) - log q(z|x) at z ~ q(z|x)), evaluated under a fixed seed so that figures
are comparable between epochs and runs, and without touching the caller's random stream.
"""

from __future__ import annotations

import math

import torch

__all__ = ["elbo_terms", "evaluate"]


def elbo_terms(vae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image ELBO terms, each of shape (batch,), from one reparameterized z ~ q(z|x)."""
    q = vae.guide_net(x)
    z = q.rsample()  # (batch, z_dim)
    log_px_z = vae.likelihood(vae.decoder(z)).log_prob(x)  # (batch,)
    kl = q.log_prob(z) - vae.prior().log_prob(z)  # (batch,) single-sample KL estimate
    return {"reconstruction": log_px_z, "kl": kl, "elbo": log_px_z - kl}


@torch.no_grad()
def evaluate(vae, images: torch.Tensor, batch_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean -ELBO, reconstruction log-likelihood and KL per image (nats) on model-ready ``images``.

    For 8-bit likelihoods also ``bits_per_dim`` = -ELBO / (C * H * W * ln 2), an upper bound on the
    model's bits/dim.
    """
    vae.check_data(images[:batch_size])
    devices = [images.device] if images.device.type == "cuda" else []
    totals = {"elbo": 0.0, "reconstruction": 0.0, "kl": 0.0}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, images.shape[0], batch_size):
            terms = elbo_terms(vae, images[start:start + batch_size])
            for key in totals:
                totals[key] += terms[key].sum().item()
    n = images.shape[0]
    result = {
        "neg_elbo": -totals["elbo"] / n,
        "reconstruction": totals["reconstruction"] / n,
        "kl": totals["kl"] / n,
        "images": n,
    }
    if getattr(vae.likelihood, "data_kind", None) == "8bit":  # a discrete likelihood: bits per dimension
        result["bits_per_dim"] = result["neg_elbo"] / (math.prod(vae.image_shape) * math.log(2))
    return result
