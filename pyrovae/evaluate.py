"""Test-set figures, per image in nats, computed with plain torch from the VAE's parts.

The -ELBO here is the same single-sample estimator as Pyro's ``Trace_ELBO``
(log p(x|z) + log p(z) - log q(z|x) at z ~ q(z|x)), evaluated under a fixed seed so that figures
are comparable between epochs and runs, and without touching the caller's random stream.
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["seeded_noise", "elbo_terms", "evaluate", "importance_log_likelihood", "active_units"]


@contextlib.contextmanager
def seeded_noise(seed: int, device: torch.device):
    """Draw from torch's generators seeded with ``seed`` inside the block, leaving the caller's streams
    as they were (CPU, and ``device``'s when it is a GPU)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def elbo_terms(vae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image ELBO terms, each of shape (batch,), from one reparameterized z ~ q(z|x)."""
    q = vae.guide_net(x)
    z = q.rsample()  # (batch, z_dim)
    log_px_z = vae.likelihood.log_prob(vae.decoder(z), x)  # (batch,)
    kl = q.log_prob(z) - vae.prior().log_prob(z)  # (batch,) single-sample KL estimate
    return {"reconstruction": log_px_z, "kl": kl, "elbo": log_px_z - kl}


@torch.no_grad()
def evaluate(vae, images: torch.Tensor, batch_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean -ELBO, reconstruction log-likelihood and KL per image (nats) on model-ready ``images``.

    For 8-bit likelihoods also ``bits_per_dim`` = -ELBO / (C * H * W * ln 2), an upper bound on the
    model's bits/dim.
    """
    vae.check_data(images[:batch_size])
    totals = {"elbo": 0.0, "reconstruction": 0.0, "kl": 0.0}
    with seeded_noise(seed, images.device):
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


@torch.no_grad()
def importance_log_likelihood(vae, images: torch.Tensor, k: int = 1000, batch_size: int = 100,
                              max_rows: int = 4096, seed: int = 0) -> dict[str, float]:
    """-log p(x) per image by importance sampling with the encoder (the IWAE bound, Burda et al. 2015).

    log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x),  z_k ~ q(z|x),

    which tends to log p(x) as K grows. The K samples are drawn in chunks of at most ``max_rows``
    decoder rows (images x samples), so memory stays bounded whatever K is. Also returns the
    single-sample ELBO from the same draws (the mean log weight) and, for 8-bit likelihoods, bits/dim.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of importance samples K must be a positive integer, got {k!r}")
    vae.check_data(images[:batch_size])
    total_log_px, total_elbo, n = 0.0, 0.0, images.shape[0]
    with seeded_noise(seed, images.device):
        prior = vae.prior()
        for start in range(0, n, batch_size):
            x = images[start:start + batch_size]  # (B, C, H, W)
            q = vae.guide_net(x)  # batch (B,), event (z_dim,)
            per_chunk = max(1, max_rows // x.shape[0])
            log_w = []
            for done in range(0, k, per_chunk):
                m = min(per_chunk, k - done)
                z = q.sample((m,))  # (m, B, z_dim)
                log_px_z = vae.likelihood.log_prob(vae.decoder(z), x)  # (m, B): x broadcast, not copied m times
                log_w.append(log_px_z + prior.log_prob(z) - q.log_prob(z))  # (m, B)
            log_w = torch.cat(log_w)  # (K, B)
            total_log_px += (torch.logsumexp(log_w, 0) - math.log(k)).sum().item()
            total_elbo += log_w.mean(0).sum().item()
    result = {"neg_log_likelihood": -total_log_px / n, "neg_elbo": -total_elbo / n, "k": k, "images": n}
    if getattr(vae.likelihood, "data_kind", None) == "8bit":
        result["bits_per_dim"] = result["neg_log_likelihood"] / (math.prod(vae.image_shape) * math.log(2))
    return result


@torch.no_grad()
def active_units(vae, images: torch.Tensor, threshold: float = 0.01, batch_size: int = 1000) -> dict:
    """Latent dimensions the model uses (Burda et al. 2015): Var_x(E_q[z_i | x]) > ``threshold``.

    E_q[z|x] is the guide's representative code (the encoder mean; for a flow guide, the mean pushed
    through the flows).
    """
    codes = torch.cat([vae.guide_net.location(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    variance = codes.var(0)  # (z_dim,)
    return {"active_units": int((variance > threshold).sum()), "z_dim": int(codes.shape[1]),
            "threshold": threshold, "variances": variance.tolist()}
