"""CIFAR-10 with the residual convolutional VAE (``network = "resnet"`` in the config) and a discretized
logistic mixture likelihood: test bits/dim at a budget.

Reads ``experiments/configs/cifar10.toml`` (another with ``--config``, keys overridable with ``--set``), trains, and reports test
bits/dim from the ELBO (all test images) and from importance sampling with K samples (the first
``--test-images``). Into ``--out`` (``results/cifar10``) go the run's config and metrics, and the
figures: the loss curve in bits/dim, samples from the prior, reconstructions of test images spread
over the set and of two images of every class, and latent-space interpolations between test images
of different classes; for a stack of latent layers (``cifar10_ladder.toml``) also ``layers.png``,
each row one draw of the top layer with the lower layers drawn again. ``--figures-only`` makes the figures again from the finished run.
The run (with its checkpoint) goes to ``RUNS/<name of the --out folder>`` (``runs/cifar10``). Data:
the image-folder copy of CIFAR-10 (JPEG-encoded, so figures are close to, not equal to, those on the
original release) or torchvision's download.

    python experiments/reproductions/cifar10_conv.py --epochs 5
    python experiments/reproductions/cifar10_conv.py --figures-only     # figures of the finished run again
    python experiments/reproductions/cifar10_conv.py --smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

import pyrovae
from pyrovae import plots
from pyrovae.config import Config
from pyrovae.data import prepare_test
from pyrovae.engine import Interrupted
from pyrovae.evaluate import importance_log_likelihood, seeded_noise
from pyrovae.experiment import add_output_flags, output_folders
from pyrovae.atomic import write_json
from pyrovae.provenance import provenance
from pyrovae.runs import train_run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10.toml"
OUT, RUNS = "results/cifar10", "runs"
#: CIFAR-10's classes in label order (torchvision's order, which is also the sorted folder names)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: pairs of classes whose first test images the interpolation figure joins
PAIRS = [(0, 8), (1, 9), (3, 5), (4, 7), (2, 6)]


@torch.no_grad()
def showcase(vae, test: torch.Tensor, labels: torch.Tensor, history: list[dict], out: Path, seed: int = 0) -> None:
    """The figures of a trained CIFAR-10 model, into ``out``."""
    vae.eval()
    plots.loss_curve(history, out / "loss_curve.png", title="CIFAR-10: -ELBO per dimension")
    names = CLASSES if int(labels.max()) < len(CLASSES) else [str(c) for c in range(int(labels.max()) + 1)]
    plots.class_grid(vae, test, labels, names, out / "classes.png", per_class=2,
                     title="two test images of every class, each above its reconstruction E[x|z = mean of q(z|x)]")
    first = {c: int((labels == c).nonzero()[0]) for c in range(len(names)) if (labels == c).any()}
    pairs = [(first[a], first[b]) for a, b in PAIRS if a in first and b in first]
    if not pairs:  # a test subset of one class: join images from its two ends instead
        pairs = [(i, len(test) - 1 - i) for i in range(min(len(PAIRS), len(test) // 2))]
    starts = test[torch.tensor([a for a, _ in pairs], device=test.device)]
    ends = test[torch.tensor([b for _, b in pairs], device=test.device)]
    plots.interpolation_grid(vae, starts, ends, out / "interpolation.png", steps=8,
                             title="E[x|z] along straight lines between the codes of two test images")
    with seeded_noise(seed, test.device):
        plots.image_grid(vae.sample(100), out / "samples.png", nrow=10, title="E[x|z] for z ~ p(z)")
        if hasattr(vae, "latents"):  # a stack of layers: what the top layer fixes, what the lower ones vary
            plots.layers_grid(vae, out / "layers.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=CONFIG,
                   help="the run's config (default: experiments/configs/cifar10.toml; cifar10_ladder_residual.toml, "
                        "cifar10_ladder_free_bits.toml and cifar10_ladder.toml are the stacks)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs of the config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--particles", dest="k", type=int, default=100, help="importance samples per image")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--resume", action="store_true", help="continue the run in --runs to --epochs")
    p.add_argument("--figures-only", action="store_true",
                   help="make the figures of the finished run in --runs again (no training, no IWAE)")
    add_output_flags(p, out=OUT, runs=RUNS, smoke="a few steps on a few images")
    args = p.parse_args(argv)

    overrides = list(args.set)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.smoke:
        overrides += ["train.epochs=1", "train.train_subset=256", "train.test_subset=64", "train.batch_size=64",
                      "model.likelihood_options.components=2", "model.network_options.width=8"]
    config = Config.load(args.config, overrides)
    k, test_images = (4, 16) if args.smoke else (args.k, args.test_images)

    with output_folders(args.smoke, args.out, args.runs, default_out=OUT, default_runs=RUNS) as folders:
        run_dir = folders.runs / folders.out.name
        if args.figures_only:
            vae = pyrovae.load(run_dir)
            device = next(vae.parameters()).device
            test, labels = prepare_test(vae.config, device)
            history = json.loads((run_dir / "metrics.json").read_text())["epochs"]
            folders.out.mkdir(parents=True, exist_ok=True)
            showcase(vae, test, labels, history, folders.out)
            print(f"figures of {run_dir} written to {folders.out}")
            return 0
        try:
            trained = train_run(config, run_dir, overwrite=not args.resume, resume=args.resume, quiet=args.smoke)
        except Interrupted as e:  # paused by a signal: the checkpoint is written; say how to go on
            again = " ".join(["python", *sys.argv, *([] if args.resume else ["--resume"])])
            print(f"{e.args[0].split('. Resume with')[0]}.\nResume with: {again}", file=sys.stderr)
            return 128 + e.signum
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
        for name in ("config.json", "metrics.json", "reconstructions.png"):
            shutil.copy(run_dir / name, folders.out / name)
        showcase(trained.vae, trained.data.test, trained.data.test_labels, history, folders.out)
        write_json(folders.out / "summary.json", {**summary, **provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
