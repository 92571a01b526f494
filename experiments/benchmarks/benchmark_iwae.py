"""Time and memory of -log p(x) by IWAE-5000 on the whole MNIST test set, and ratios from one run.

1. The full figure: ``importance_log_likelihood(vae, test, k=5000)`` over all 10,000 test images,
   in wall-clock seconds, with the peak resident memory of the process (``ru_maxrss``: everything the
   process holds, torch and the dataset included).
2. On a slice of the test set, interleaved rounds of four things over the same decoder rows:
   - ``ours``: the estimator above (oneDNN products, the block-product Bernoulli log-density);
   - ``stock``: a straightforward chunked estimator written with stock torch ops: each image copied
     once per sample, ``F.linear`` (torch's default BLAS), ``F.softplus``, ``torch.distributions``'
     Bernoulli. It draws the same z as ``ours``, so the two figures must agree to float32 rounding:
     the script stops if they differ by more than 1e-3 nats;
   - ``floor``: the decoder's matrix products alone, through the same oneDNN path as ``ours``;
   - ``blas floor``: the same products with ``torch.mm`` (the default BLAS).
   The script prints the medians and the ratios.

The 33 TFLOP of the default decoder's products (5 x 10^7 rows of 50x400 and 400x784) are most of
the work; the rest is the Bernoulli log-density, elementwise over 784 logits per row.

    PYROVAE_DATA=../shared/data python experiments/benchmarks/benchmark_iwae.py --checkpoint runs/mnist_meanfield
    python experiments/benchmarks/benchmark_iwae.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import math
import resource
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.checkpoint import load_vae
from pyrovae.config import Config
from pyrovae.data import prepare_test
from pyrovae.evaluate import _CPUFastPaths, importance_log_likelihood, seeded_noise
from pyrovae.experiment import add_output_flags, output_folders
from pyrovae.build import build_vae
from pyrovae.atomic import write_json
from pyrovae.provenance import provenance

OUT = "results/benchmark_iwae"


def peak_memory_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def stock_decoder(decoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The MLP decoder's logits computed with stock torch ops only: F.linear and F.softplus."""
    h = z
    for layer in decoder.net:
        if isinstance(layer, nn.Linear):
            h = F.linear(h, layer.weight, layer.bias)
        elif isinstance(layer, nn.Softplus):
            h = F.softplus(h)
        else:
            h = layer(h)
    return h.unflatten(-1, decoder.image_shape)


@torch.no_grad()
def stock_estimator(vae, images, k, batch_size=100, max_rows=4096, seed=0):
    """The straightforward chunked IWAE-K, with the same draws as ``importance_log_likelihood``."""
    total = 0.0
    with seeded_noise(seed, images.device):
        prior = vae.prior()
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size]
            q = vae.posterior(x)
            m_max = max(1, max_rows // x.shape[0])
            log_w = []
            for done in range(0, k, m_max):
                m = min(m_max, k - done)
                z = q.sample((m,))  # (m, B, z_dim)
                logits = stock_decoder(vae.decoder, z.flatten(0, 1))  # (m * B, C, H, W)
                x_rep = x.expand(m, *x.shape).flatten(0, 1)  # each image copied m times
                log_px_z = torch.distributions.Bernoulli(logits=logits).log_prob(x_rep).flatten(1).sum(1)
                log_w.append(log_px_z.view(m, -1) + prior.log_prob(z) - q.log_prob(z))
            total += (torch.logsumexp(torch.cat(log_w), 0) - math.log(k)).sum().item()
    return -total / images.shape[0]


@torch.no_grad()
def matmul_floor(decoder: nn.Module, rows: int, chunk: int = 4000, blas: bool = False) -> None:
    """The decoder's Linear products alone, ``rows`` rows in chunks of ``chunk``: through the decoder's
    own layers on the estimator's oneDNN route (its ``_CPUFastPaths``), or with ``torch.mm`` (the
    default BLAS) when ``blas``."""
    layers = [m for m in decoder.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise SystemExit("the floor is measured for MLP decoders (made of nn.Linear layers)")
    inputs = [torch.randn(chunk, m.in_features) for m in layers]
    with contextlib.nullcontext() if blas else _CPUFastPaths():
        for done in range(0, rows, chunk):
            n = min(chunk, rows - done)
            for a, m in zip(inputs, layers):
                torch.mm(a[:n], m.weight.t()) if blas else m(a[:n])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a run folder or checkpoint.pt (default: an untrained default VAE; "
                                             "the time hardly depends on the weights)")
    parser.add_argument("--particles", dest="k", type=int, default=5000)
    parser.add_argument("--images", type=int, default=None, help="test images for the full figure (default: all)")
    parser.add_argument("--ratio-images", type=int, default=40, help="test images for the interleaved ratios")
    parser.add_argument("--rounds", type=int, default=3)
    add_output_flags(parser, out=OUT, smoke="seconds-long run on a few images, K=20")
    args = parser.parse_args(argv)
    if args.smoke:
        args.k, args.images, args.ratio_images, args.rounds = 20, 30, 10, 1

    if args.checkpoint:
        vae, config, state = load_vae(args.checkpoint)
        source = f"{args.checkpoint} (epoch {state['state']['epoch']})"
    else:
        config = Config()
        torch.manual_seed(0)
        vae = build_vae(config.model)
        source = "untrained default VAE"
    vae.eval()
    test, _ = prepare_test(config, torch.device("cpu"))
    if args.images:
        test = test[:args.images]
    print(f"{source}; {test.shape[0]} test images, K={args.k}, {torch.get_num_threads()} threads", flush=True)

    memory_before = peak_memory_gb()
    start = time.perf_counter()
    full = importance_log_likelihood(vae, test, k=args.k)
    seconds = time.perf_counter() - start
    memory_peak = peak_memory_gb()
    print(f"IWAE-{args.k}: -log p(x) = {full['neg_log_likelihood']:.3f} nats/image on {test.shape[0]} images in "
          f"{seconds:.1f} s ({seconds / 60:.2f} min); peak resident memory {memory_peak:.2f} GB "
          f"({memory_before:.2f} GB before the estimate)", flush=True)

    part = test[:args.ratio_images]
    rows = part.shape[0] * args.k
    times = {"ours": [], "stock": [], "floor": [], "blas floor": []}
    values = {}
    for _ in range(args.rounds):
        for name in times:
            t0 = time.perf_counter()
            if name == "ours":
                values[name] = importance_log_likelihood(vae, part, k=args.k)["neg_log_likelihood"]
            elif name == "stock":
                values[name] = stock_estimator(vae, part, args.k)
            else:
                matmul_floor(vae.decoder, rows, blas=name == "blas floor")
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {"ours/stock": medians["ours"] / medians["stock"], "ours/floor": medians["ours"] / medians["floor"],
              "floor/blas floor": medians["floor"] / medians["blas floor"]}
    for name, t in medians.items():
        print(f"{name:10s} {t:8.2f} s for {rows} decoder rows ({t / rows * 1e6:.2f} s per million rows)")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"-log p(x) on the slice: ours {values['ours']:.5f}, stock {values['stock']:.5f} nats (same draws)")
    if abs(values["ours"] - values["stock"]) > 1e-3:
        raise SystemExit(f"ours and the stock estimator disagree beyond float32 rounding: {values}")

    with output_folders(args.smoke, args.out, default_out=OUT) as folders:
        folders.out.mkdir(parents=True, exist_ok=True)
        write_json(folders.out / "results.json", {
            "model": source, "k": args.k, "images": int(test.shape[0]),
            "neg_log_likelihood": full["neg_log_likelihood"],
            "neg_elbo_same_draws": full["neg_elbo"], "seconds": seconds, "peak_memory_gb": memory_peak,
            "memory_before_estimate_gb": memory_before, "threads": torch.get_num_threads(),
            "ratio_images": int(part.shape[0]), "rounds": args.rounds, "seconds_per_round": times,
            "medians": medians, "ratios": ratios, "slice_values": values, **provenance("cpu")})


if __name__ == "__main__":
    main()
