"""IWAE-K time of the estimator with its CPU fast paths in the estimator (pyrovae now) against the
same fast paths in the building blocks (pyrovae at HEAD, copied to /tmp/oldfast), in one process.

Both estimators see the same weights, images and seed, so they draw the same z and must give the
same figure (to float32 rounding); the script stops if they differ by more than 1e-3 nats.
Rounds are interleaved, alternating which goes first, and the ratio is of medians.

    cd /work/main && .venv/bin/python /tmp/compare_fast.py               # the full comparison, K=5000
    cd /work/main && .venv/bin/python /tmp/compare_fast.py --k 50 --images 4 --rounds 1   # a check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, "/tmp")  # the package oldfast: networks.py, likelihoods.py, evaluate.py from HEAD

from oldfast import evaluate as old_evaluate  # noqa: E402
from oldfast import likelihoods as old_likelihoods  # noqa: E402
from oldfast import networks as old_networks  # noqa: E402
from pyrovae import Config, build_vae  # noqa: E402
from pyrovae import evaluate as new_evaluate  # noqa: E402
from pyrovae.likelihoods import BernoulliLikelihood  # noqa: E402


def default_vae(seed: int = 0):
    torch.manual_seed(seed)
    vae = build_vae(Config().model)
    return vae.eval()


def old_style(vae):
    """``vae`` with its layers and likelihood swapped, in place, for the HEAD classes with the fast paths
    inside (``networks.Linear``, ``networks.Softplus``, ``BernoulliLikelihood.log_prob``)."""
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    for module in list(vae.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, old_networks.Linear(child.in_features, child.out_features))
            elif type(child) is nn.Softplus:
                setattr(module, name, old_networks.Softplus())
    if type(vae.likelihood) is not BernoulliLikelihood:
        raise SystemExit("this comparison is for the default VAE, whose likelihood is the Bernoulli")
    vae.likelihood = old_likelihoods.BernoulliLikelihood()
    vae.load_state_dict(state)  # the same weights, keys unchanged
    return vae


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    new_vae = default_vae()
    old_vae = old_style(default_vae())
    assert all(torch.equal(a, b) for a, b in zip(new_vae.state_dict().values(), old_vae.state_dict().values()))
    assert not any(isinstance(m, (old_networks.Linear, old_networks.Softplus)) for m in new_vae.modules())
    assert {type(m) for m in old_vae.decoder.modules()} >= {old_networks.Linear, old_networks.Softplus}
    images = torch.bernoulli(torch.full((args.images, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(1))

    runs = {
        "old": lambda k: old_evaluate.importance_log_likelihood(old_vae, images, k=k, seed=args.seed),
        "new": lambda k: new_evaluate.importance_log_likelihood(new_vae, images, k=k, seed=args.seed),
    }
    for run in runs.values():  # warm-up: first-call costs (oneDNN primitives, allocator) out of the timings
        run(min(args.k, 20))
    print(f"IWAE-{args.k} on {args.images} random binary 28x28 images, default VAE, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds", flush=True)
    times = {name: [] for name in runs}
    values = {}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            values[name] = runs[name](args.k)["neg_log_likelihood"]
            times[name].append(time.perf_counter() - start)
            print(f"round {r + 1} {name}: {times[name][-1]:.2f} s, -log p(x) = {values[name]:.5f}", flush=True)

    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["new"] / medians["old"]
    print(f"medians: old {medians['old']:.2f} s, new {medians['new']:.2f} s; new/old = {ratio:.3f} "
          f"({'within' if ratio <= 1.05 else 'OUTSIDE'} 5%)")
    difference = abs(values["new"] - values["old"])
    print(f"-log p(x): old {values['old']:.5f}, new {values['new']:.5f} nats (difference {difference:.2e})")
    if difference > 1e-3:
        raise SystemExit(f"old and new estimators disagree by more than 1e-3 nats: {values}")


if __name__ == "__main__":
    main()
