"""CIFAR-10 with the residual convolutional VAE (``network = "resnet"`` in the config) and a discretized
logistic mixture likelihood: test bits/dim at a budget.

Reads ``experiments/configs/cifar10.toml`` (overridable with ``--set``), trains, and reports test
bits/dim from the ELBO (all test images) and from importance sampling with K samples (the first
``--test-images``), with samples and reconstructions as PNG grids in ``--out`` (``results/cifar10``).
The run (with its checkpoint) goes to ``RUNS/<name of the --out folder>`` (``runs/cifar10``). Data:
the image-folder copy of CIFAR-10 (JPEG-encoded, so figures are close to, not equal to, those on the
original release) or torchvision's download.

    python experiments/reproductions/cifar10_conv.py --epochs 5
    python experiments/reproductions/cifar10_conv.py --smoke
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pyrovae.config import Config
from pyrovae.evaluate import importance_log_likelihood
from pyrovae.experiment import add_output_flags, output_folders
from pyrovae.runs import provenance, train_run, write_json

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10.toml"
OUT, RUNS = "results/cifar10", "runs"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs of the config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--particles", dest="k", type=int, default=100, help="importance samples per image")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--resume", action="store_true", help="continue the run in --runs to --epochs")
    add_output_flags(p, out=OUT, runs=RUNS, smoke="a few steps on a few images")
    args = p.parse_args(argv)

    overrides = list(args.set)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.smoke:
        overrides += ["train.epochs=1", "train.train_subset=256", "train.test_subset=64", "train.batch_size=64",
                      "model.likelihood_options.components=2", "model.network_options.width=8"]
    config = Config.load(CONFIG, overrides)
    k, test_images = (4, 16) if args.smoke else (args.k, args.test_images)

    with output_folders(args.smoke, args.out, args.runs, default_out=OUT, default_runs=RUNS) as folders:
        run_dir = folders.runs / folders.out.name
        trained = train_run(config, run_dir, overwrite=not args.resume, resume=args.resume, quiet=args.smoke)
        iwae = importance_log_likelihood(trained.vae, trained.data.test[:test_images], k=k, batch_size=50)
        history = trained.metrics["epochs"]
        last = history[-1]
        summary = {"epochs": last["epoch"], "train_seconds": sum(r["seconds"] for r in history),
                   "test_bits_per_dim_elbo": last["test_bits_per_dim"], "iwae_bits_per_dim": iwae["bits_per_dim"],
                   "k": k, "iwae_test_images": test_images,
                   "curve_bits_per_dim": [r["test_bits_per_dim"] for r in history]}
        print(f"after {summary['epochs']} epochs ({summary['train_seconds']:.0f} s of training): test bits/dim "
              f"{summary['test_bits_per_dim_elbo']:.3f} (ELBO, all test images), {summary['iwae_bits_per_dim']:.3f} "
              f"(IWAE-{k}, first {test_images} images)")
        folders.out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "metrics.json", "loss_curve.png", "reconstructions.png", "samples.png"):
            shutil.copy(run_dir / name, folders.out / name)
        write_json(folders.out / "summary.json", {**summary, **provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
