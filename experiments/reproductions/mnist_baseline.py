"""The foundation's quality targets: the default VAE on dynamically binarized MNIST.

Trains the default configuration (784-400-50, softplus, batch 256, Adam 1e-3, TraceMeanField_ELBO;
``--objective trace_elbo`` for Pyro's plain Monte Carlo ELBO) and prints test -ELBO per image (nats,
test set binarized once with a fixed seed) after 20 epochs and at the end, with the median seconds
per training epoch. The run (with its checkpoint) goes to ``RUNS/<name of the --out folder>``
(``runs/mnist`` by default); metrics and figures are copied to ``--out`` (``results/mnist``).

    python experiments/reproductions/mnist_baseline.py --epochs 100          # the full target run
    python experiments/reproductions/mnist_baseline.py --smoke               # seconds, for the tests
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys

from pyrovae.config import Config
from pyrovae.experiment import add_output_flags, output_folders
from pyrovae.atomic import write_json
from pyrovae.provenance import provenance
from pyrovae.runs import train_run

TARGETS = {20: 101.2, 100: 96.8}  # nats/image reached by the stock Pyro VAE of this shape
OUT, RUNS = "results/mnist", "runs"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--activation", default=Config().model.activation)
    p.add_argument("--objective", default=Config().train.objective)
    add_output_flags(p, out=OUT, runs=RUNS, smoke="tiny budget: 1 epoch on 512 images")
    args = p.parse_args(argv)

    config = Config().replace(model={"activation": args.activation},
                              train={"epochs": args.epochs, "seed": args.seed, "objective": args.objective})
    if args.smoke:
        config = config.replace(train={"epochs": 1, "train_subset": 512, "test_subset": 500})
    with output_folders(args.smoke, args.out, args.runs, default_out=OUT, default_runs=RUNS) as folders:
        run_dir = folders.runs / folders.out.name  # results/mnist_trace_elbo <- runs/mnist_trace_elbo
        history = train_run(config, run_dir, overwrite=True, quiet=args.smoke).metrics["epochs"]

        seconds = [h["seconds"] for h in history]
        summary = {"median_epoch_seconds": statistics.median(seconds),
                   "test_neg_elbo": {h["epoch"]: h["test_neg_elbo"] for h in history if h["epoch"] in TARGETS},
                   "final": {"epoch": history[-1]["epoch"], "test_neg_elbo": history[-1]["test_neg_elbo"]},
                   "targets": TARGETS, **provenance()}
        print(f"median training epoch: {summary['median_epoch_seconds']:.2f} s over {len(seconds)} epochs")
        for epoch, target in TARGETS.items():
            if epoch <= len(history):
                value = history[epoch - 1]["test_neg_elbo"]
                verdict = "met" if value <= target else "NOT met"
                print(f"test -ELBO after {epoch} epochs: {value:.2f} nats/image (target <= {target}: {verdict})")

        folders.out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "metrics.json", "loss_curve.png", "reconstructions.png", "samples.png"):
            shutil.copy(run_dir / name, folders.out / name)
        write_json(folders.out / "summary.json", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
