"""Test-set figures, per image in nats, computed with plain torch from the VAE's parts.

The -ELBO here is the same single-sample estimator as Pyro's ``Trace_ELBO``
(log p(x|z) + log p(z) - log q(z|x) at z ~ q(z|x)), evaluated under a fixed seed so that figures
are comparable between epochs and runs, and without touching the caller's random stream.

The importance-sampled log-likelihood runs the decoder millions of times without gradients. On the
CPU, in float32, it computes the same numbers (to float32 rounding) by faster routes than the stock
ops the networks and likelihoods are written with; see :class:`_CPUFastPaths` and
:func:`_bernoulli_log_prob`. Everywhere else, and with gradients, the stock ops are used.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.overrides import TorchFunctionMode

from pyrovae.distributed import World, shard
from pyrovae.likelihoods import BernoulliLikelihood
from pyrovae.matmul import float32_on_cpu as _float32_on_cpu, linear_or_none, onednn_available
from pyrovae.progress import progress

__all__ = ["seeded_noise", "elbo_terms", "evaluate", "importance_log_likelihood", "active_units"]


@contextlib.contextmanager
def seeded_noise(seed: int, device: torch.device):
    """Draw from torch's generators seeded with ``seed`` inside the block, leaving the caller's streams
    as they were (CPU, and ``device``'s when it is a GPU)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def batch_noise(seed: int, start: int, device: torch.device):
    """The draws for the batch that begins at image ``start``: its own stream, whoever scores it."""
    return seeded_noise(seed * 1_000_003 + start, device)


def _my_batches(n: int, batch_size: int, world: World) -> range:
    """The start of every batch of ``n`` images that this process scores (all of them in one process)."""
    starts = range(0, n, batch_size)
    return starts[shard(len(starts), world)]


def elbo_terms(vae, x: torch.Tensor, fast=None) -> dict[str, torch.Tensor]:
    """Per-image ELBO terms, each of shape (batch,), from one reparameterized z ~ q(z|x); for a stack
    of layers also each layer's KL estimate, ``kl_z1``, ``kl_z2``, ... (``kl`` is their sum).
    ``fast``: the context the networks run in (:func:`_fast_paths_for`, as :func:`evaluate` passes
    it without gradients). One layer scores its likelihood through :func:`_log_px_z` (the fast
    Bernoulli form on binary float32 CPU images without gradients), a stack through its own."""
    fast = fast or contextlib.nullcontext()
    if hasattr(vae, "stack_terms"):
        with fast:
            terms = vae.stack_terms(x)
        layers = {f"kl_{name}": q.log_prob(z) - p.log_prob(z) for name, (z, q, p) in terms["layers"].items()}
        kl = sum(layers.values())
        return {"reconstruction": terms["reconstruction"], "kl": kl, "elbo": terms["reconstruction"] - kl, **layers}
    with fast:
        q = vae.posterior(x)
    z = q.rsample()  # (batch, z_dim)
    with fast:
        outputs, prior = vae.decoder(z), vae.prior()
    log_px_z = _log_px_z(vae.likelihood, outputs, x)  # (batch,)
    kl = q.log_prob(z) - prior.log_prob(z)  # (batch,) single-sample KL estimate
    return {"reconstruction": log_px_z, "kl": kl, "elbo": log_px_z - kl}


@torch.no_grad()
def evaluate(vae, images: torch.Tensor, batch_size: int = 1000, seed: int = 0, world: World = World()
             ) -> dict[str, float]:
    """Mean -ELBO, reconstruction log-likelihood and KL per image (nats) on model-ready ``images``;
    for a stack of layers also each layer's KL, ``kl_layers`` ({"z1": ..., "z2": ...}).

    For 8-bit likelihoods also ``bits_per_dim`` = -ELBO / (C * H * W * ln 2), an upper bound on the
    model's bits/dim. The draws belong to the batches (:func:`batch_noise`), so under torchrun the
    processes share the batches out and the figures are those of one process. On the CPU in float32
    the networks take the estimator's fast routes, and a one-layer model's Bernoulli likelihood its
    fast form, as in :func:`importance_log_likelihood`.
    """
    vae.check_data(images[:batch_size])
    keys = ["elbo", "reconstruction", "kl", *(f"kl_{vae.site(layer)}" for layer in range(1, len(
        getattr(vae, "latents", ())) + 1))]
    sums = torch.zeros(len(keys), dtype=torch.float64, device=images.device)
    fast = _fast_paths_for(images)
    for start in _my_batches(images.shape[0], batch_size, world):
        with batch_noise(seed, start, images.device):
            terms = elbo_terms(vae, images[start:start + batch_size], fast)
        sums += torch.stack([terms[key].double().sum() for key in keys])
    n = images.shape[0]
    means = dict(zip(keys, (total / n for total in world.sum_(sums).tolist())))
    result = {"neg_elbo": -means["elbo"], "reconstruction": means["reconstruction"], "kl": means["kl"], "images": n}
    if len(keys) > 3:
        result["kl_layers"] = {key[3:]: means[key] for key in keys[3:]}
    if getattr(vae.likelihood, "data_kind", None) == "8bit":  # a discrete likelihood: bits per dimension
        result["bits_per_dim"] = result["neg_elbo"] / (math.prod(vae.image_shape) * math.log(2))
    return result


# --- CPU fast paths of the importance-sampled estimator ---------------------------------------------
#: Whether oneDNN runs the estimator's linear layers; cleared for good the first time oneDNN refuses
#: a product, after which the stock op runs.
_ONEDNN = onednn_available()


def _onednn_linear(x, weight, bias=None, *more, **options):
    """x @ weight.T + bias through oneDNN (:func:`pyrovae.matmul.linear_or_none`), or None where that
    route does not apply or oneDNN refused before.

    oneDNN's float32 product keeps every vector unit of the CPU busy; torch's default BLAS may not
    (on an AMD EPYC, 450 against 170 GFLOP/s for the default decoder's 4096x400x784 product). It is
    the same product, rounded differently in the last bits.
    """
    global _ONEDNN
    if not _ONEDNN:
        return None
    try:
        return linear_or_none(x, weight, bias, *more, **options)
    except RuntimeError:  # a build whose oneDNN cannot run this product: the stock op from now on
        _ONEDNN = False
        return None


def _softplus_without_log1p(x, beta=1.0, threshold=20.0, *more, **options):
    """softplus(x) = relu(x) + log(1 + exp(-|x|)) for the default beta and threshold on a floating-point
    CPU tensor, or None otherwise.

    The two forms are equal algebraically and, in float32, agree within 6e-8 everywhere (the rounding
    of 1 + exp(-|x|)); the stock kernel spends most of its time in a scalar log1p (about 5 ns a value
    on the CPU), which the vectorized exp and log here avoid.
    """
    if (more or options or beta != 1 or threshold != 20 or not isinstance(x, torch.Tensor)
            or x.device.type != "cpu" or not x.is_floating_point()):
        return None
    return x.abs().neg_().exp_().add_(1).log_().add_(x.clamp_min(0))


class _CPUFastPaths(TorchFunctionMode):
    """Reroutes, while active, the two functions that take most of the decoder's time on the CPU.

    ``nn.Linear`` and ``F.linear`` reach torch as ``torch._C._nn.linear``, ``nn.Softplus`` and
    ``F.softplus`` as ``torch._C._nn.softplus``: those go to :func:`_onednn_linear` and
    :func:`_softplus_without_log1p`, which decline (return None) calls they do not cover, such as an
    ``out=`` argument or another beta; every other function, and every declined call, runs as it
    would without the mode. Intercepting the calls here, rather than in the networks, keeps the
    networks stock torch modules that compute one function one way.

    With gradients enabled every call runs stock: neither route records a gradient.
    """

    _ROUTES = {torch._C._nn.linear: _onednn_linear, torch._C._nn.softplus: _softplus_without_log1p}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = self._ROUTES.get(func)
        if route is not None and not torch.is_grad_enabled():
            out = route(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _fast_paths_for(images: torch.Tensor):
    """The context the estimator runs its networks in: the fast routes for float32 images on the CPU
    without gradients, otherwise nothing. Either can be entered again and again."""
    if _float32_on_cpu(images) and not torch.is_grad_enabled():
        return _CPUFastPaths()
    return contextlib.nullcontext()


def _sum_log_1p(y: torch.Tensor) -> torch.Tensor:
    """sum_j log(1 + y_j) over the last dim, for y in [0, 1], overwriting ``y``.

    A product of at most 120 factors 1 + y_j <= 2 is at most 2^120, well inside float32's range, so
    the pixels can be multiplied in blocks and the sum needs one logarithm per block, not per pixel.
    """
    n = y.shape[-1]
    block = max(d for d in range(1, 121) if n % d == 0)
    y.add_(1)
    if block < 16:  # a pixel count with no useful divisor (a large prime): one log per pixel
        return y.log_().sum(-1)
    return y.unflatten(-1, (n // block, block)).prod(-1).log_().sum(-1)


def _bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The Bernoulli log p(x|z) per image, as ``BernoulliLikelihood.log_prob``, in a few passes.

    log p(x|z) = sum_j x_j l_j - softplus(l_j) = -sum_j [relu(-s_j l_j) + log(1 + exp(-|l_j|))] with
    s_j = 2 x_j - 1: every term is <= 0, so the sum has no cancellation, and the log(1 + .) terms go
    through :func:`_sum_log_1p` instead of a scalar log1p per pixel. ``x`` broadcasts against the logits.
    """
    signed = (logits * (2 * x - 1)).flatten(-3)  # (..., C*H*W)
    misfit = signed.neg().clamp_min_(0).sum(-1)  # sum_j relu(-s_j l_j)
    return -(misfit + _sum_log_1p(signed.abs_().neg_().exp_()))  # (...,)


def _log_px_z(likelihood, outputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) per image for the estimator: the fast Bernoulli form on the CPU without gradients
    for binary images (the form assumes x in {0, 1}), otherwise the likelihood's own. Only the
    Bernoulli itself: a subclass may score differently."""
    if (type(likelihood) is BernoulliLikelihood and _float32_on_cpu(outputs) and not torch.is_grad_enabled()
            and bool(((x == 0) | (x == 1)).all())):
        return _bernoulli_log_prob(outputs, x)
    return likelihood.log_prob(outputs, x)


#: IWAE chunk sizes on a GPU: at most this many images a batch and decoder rows a chunk (larger
#: chunks gave no further speed on an H200), and at most this share of the GPU's memory.
GPU_IWAE_IMAGES, GPU_IWAE_ROWS, GPU_IWAE_MEMORY_SHARE = 1000, 2 ** 18, 0.25


def iwae_chunks(vae, images: torch.Tensor) -> tuple[int, int]:
    """(images per batch, decoder rows per chunk) for :func:`importance_log_likelihood` on this device.

    On the CPU, 100 images and 4,096 rows: the rows of a chunk stay in the caches. On CUDA the chunks
    grow until the estimate of a chunk's working memory, 24 bytes per number the decoder puts out
    for one row plus 16 KiB (its hidden layers and the log-density's temporaries), reaches a quarter
    of the GPU's total memory (fixed for a GPU model, so a figure repeats on it), and no more than
    is free now: at most 1,000 images and 2^18 rows. Hand-set chunks of that size ran IWAE-5000 on
    the 10,000 MNIST test images in 1.6 s on an H200, against 9.6 s with the CPU's sizes.
    """
    if images.device.type != "cuda":
        return 100, 4096
    free, total = torch.cuda.mem_get_info(images.device)
    with torch.no_grad():
        outputs = vae.outputs(vae.encode(images[:1]))  # one row
    per_row = 24 * outputs.numel() + 16 * 1024
    budget = min(GPU_IWAE_MEMORY_SHARE * total, 0.8 * free)
    rows = int(min(GPU_IWAE_ROWS, max(4096, budget // per_row)))
    return min(GPU_IWAE_IMAGES, images.shape[0], rows), rows


@torch.no_grad()
def importance_log_likelihood(vae, images: torch.Tensor, k: int = 1000, batch_size: int | None = None,
                              max_rows: int | None = None, seed: int = 0, world: World = World()) -> dict[str, float]:
    """-log p(x) per image by importance sampling with the encoder (the IWAE bound, Burda et al. 2015).

    log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x),  z_k ~ q(z|x),

    which tends to log p(x) as K grows. The K samples are drawn in chunks of at most ``max_rows``
    decoder rows (images x samples), so memory stays bounded whatever K is; both sizes are chosen
    for the device when not given (:func:`iwae_chunks`). Also returns the
    single-sample ELBO from the same draws (the mean log weight) and, for 8-bit likelihoods, bits/dim.

    On the CPU in float32 the networks' linear layers and softplus run through the fast routes of
    :class:`_CPUFastPaths`, and a Bernoulli likelihood is scored by :func:`_bernoulli_log_prob`.
    The draws belong to the batches of ``batch_size`` images, so under torchrun the processes share
    the batches out and the figure equals the one-process figure.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of importance samples K must be a positive integer, got {k!r}")
    n = images.shape[0]
    chosen = iwae_chunks(vae, images)
    batch_size, max_rows = batch_size or chosen[0], max_rows or chosen[1]
    vae.check_data(images[:batch_size])
    sums = torch.zeros(2, dtype=torch.float64, device=images.device)  # log p(x) bound, ELBO; on the device
    # Only the networks run under the fast routes: every torch call made under the mode pays for a
    # Python dispatch, which the distributions' many small operations need not.
    fast = _fast_paths_for(images)
    with fast:
        prior = vae.prior()  # a VampPrior runs the encoder here (no draws)
    mine = _my_batches(n, batch_size, world)
    for start in progress(mine, desc=f"IWAE-{k}", unit="batch", quiet=not world.main):
        x = images[start:start + batch_size]  # (B, C, H, W)
        if hasattr(vae, "log_weights"):  # a stack of layers: every layer drawn per chunk
            with batch_noise(seed, start, images.device), fast:
                per_chunk = max(1, max_rows // x.shape[0])
                log_w = torch.cat([vae.log_weights(x, min(per_chunk, k - done)) for done in range(0, k, per_chunk)])
            sums += torch.stack([(torch.logsumexp(log_w, 0) - math.log(k)).double().sum(),
                                 log_w.mean(0).double().sum()])
            continue
        with batch_noise(seed, start, images.device):  # the draws belong to this batch of images
            with fast:
                q = vae.posterior(x)  # batch (B,), event (z_dim,)
            per_chunk = max(1, max_rows // x.shape[0])
            log_w = []
            for done in range(0, k, per_chunk):
                m = min(per_chunk, k - done)
                z = q.sample((m,))  # (m, B, z_dim)
                with fast:
                    outputs = vae.decoder(z)  # (m, B, ...)
                log_px_z = _log_px_z(vae.likelihood, outputs, x)  # (m, B): x broadcast, not copied m times
                log_w.append(log_px_z + prior.log_prob(z) - q.log_prob(z))  # (m, B)
        log_w = torch.cat(log_w)  # (K, B)
        sums += torch.stack([(torch.logsumexp(log_w, 0) - math.log(k)).double().sum(), log_w.mean(0).double().sum()])
    total_log_px, total_elbo = world.sum_(sums).tolist()
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
    if hasattr(vae, "encode_layers"):  # a stack: per layer, each given the guide's means of the others
        chunks = [vae.encode_layers(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        layers = {name: _active(torch.cat([c[name] for c in chunks]), threshold) for name in chunks[0]}
        return {"active_units": sum(v["active_units"] for v in layers.values()),
                "z_dim": sum(v["z_dim"] for v in layers.values()), "threshold": threshold,
                "layers": {name: layers[name] for name in sorted(layers)}}
    codes = torch.cat([vae.posterior.location(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    return {**_active(codes, threshold), "threshold": threshold}


def _active(codes: torch.Tensor, threshold: float) -> dict:
    variance = codes.var(0)  # (z_dim,)
    return {"active_units": int((variance > threshold).sum()), "z_dim": int(codes.shape[1]),
            "variances": variance.tolist()}
