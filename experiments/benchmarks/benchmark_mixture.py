"""Scoring a VampPrior-sized Gaussian mixture: our one-product ``DiagonalNormalMixture`` against
``MixtureSameFamily``, timed in interleaved rounds of one run, with the ratio.

The mixture has the shape of a trained VampPrior in the IWAE estimator: K = 500 diagonal Gaussians in
D = 40 dimensions, scored at 4,000 points per call (one chunk of the estimator's decoder rows).
``MixtureSameFamily`` forms the (points, K, D) tensor of standardized distances; ours forms one
(points, 2D) x (2D, K) product in float64 (see ``pyrovae.priors.DiagonalNormalMixture``). The two
must agree: the script stops if they differ by more than 1e-3 nats at any point.

The components are drawn like encoder posteriors: means N(0, 3^2), scales in [0.05, 1.5]; the points
are drawn near random components, where the densities matter.

    python experiments/benchmarks/benchmark_mixture.py
    python experiments/benchmarks/benchmark_mixture.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pyro.distributions as dist
import torch

from pyrovae.experiment import add_output_flags, output_folders
from pyrovae.priors import DiagonalNormalMixture
from pyrovae.atomic import write_json
from pyrovae.provenance import provenance

OUT = "results/benchmark_mixture"


def problem(components: int, dim: int, points: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    loc = 3 * torch.randn(components, dim, generator=generator)
    scale = 0.05 + 1.45 * torch.rand(components, dim, generator=generator)
    pick = torch.randint(components, (points,), generator=generator)
    z = loc[pick] + scale[pick] * torch.randn(points, dim, generator=generator)
    return torch.zeros(components), loc, scale, z


def seconds(fn, repeats: int) -> float:
    fn()  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--components", type=int, default=500)
    parser.add_argument("--dim", type=int, default=40)
    parser.add_argument("--points", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    add_output_flags(parser, out=OUT, smoke="a second-long run on a small mixture")
    args = parser.parse_args(argv)
    if args.smoke:
        args.components, args.points, args.rounds, args.repeats = 20, 100, 1, 1

    logits, loc, scale, z = problem(args.components, args.dim, args.points)
    ours = DiagonalNormalMixture(logits, loc, scale)
    stock = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
    with torch.no_grad():
        exact = dist.MixtureSameFamily(dist.Categorical(logits=logits.double()),
                                       dist.Normal(loc.double(), scale.double()).to_event(1)).log_prob(z.double())
        error = {"ours": (ours.log_prob(z).double() - exact).abs().max().item(),
                 "stock": (stock.log_prob(z).double() - exact).abs().max().item()}
        print(f"K={args.components}, D={args.dim}, {args.points} points, {torch.get_num_threads()} threads; "
              f"largest error against float64 MixtureSameFamily: ours {error['ours']:.2e}, "
              f"stock {error['stock']:.2e} nats", flush=True)
        if error["ours"] > 1e-3:
            print(f"error: the two densities differ by {error['ours']:.2e} nats", file=sys.stderr)
            return 1
        times = {"ours": [], "stock": []}
        for _ in range(args.rounds):
            times["ours"].append(seconds(lambda: ours.log_prob(z), args.repeats))
            times["stock"].append(seconds(lambda: stock.log_prob(z), args.repeats))
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["ours"] / median["stock"]
    for name, value in median.items():
        print(f"{name:6s} {1e3 * value:8.2f} ms per call (median of {args.rounds} rounds)")
    print(f"ratio ours/stock {ratio:.3f}")
    with output_folders(args.smoke, args.out, default_out=OUT) as folders:
        folders.out.mkdir(parents=True, exist_ok=True)
        write_json(folders.out / "results.json", {
            "components": args.components, "dim": args.dim, "points": args.points, "rounds": args.rounds,
            "repeats": args.repeats, "seconds": times, "median_seconds": median, "ratio_ours_over_stock": ratio,
            "max_abs_error_nats": error, **provenance("cpu"),
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
