"""Command line: ``pyrovae train | evaluate CKPT | sample CKPT`` (also ``python -m pyrovae``)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from pyrovae.checkpoint import CheckpointError
from pyrovae.config import Config, ConfigError
from pyrovae.data import DatasetNotFoundError
from pyrovae.likelihoods import DataSupportError
from pyrovae.model import ImageShapeError
from pyrovae.run import RunFolderError
from pyrovae.train import DeviceUnavailableError, NonFiniteLossError

__all__ = ["main", "build_parser"]

#: Errors that are the user's to fix: printed as one message, no traceback.
USER_ERRORS = (ConfigError, CheckpointError, DatasetNotFoundError, DataSupportError, ImageShapeError,
               RunFolderError, DeviceUnavailableError, NonFiniteLossError)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number such as 1e-3, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(part) for part in text.replace(",", " ").split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrovae", description="Variational autoencoders as Pyro programs.")
    sub = parser.add_subparsers(dest="command", required=True)

    defaults = Config()
    t = sub.add_parser("train", help="train a VAE with SVI and write a run folder")
    t.add_argument("--epochs", type=_positive_int, default=defaults.train.epochs, help="passes over the training set")
    t.add_argument("--z-dim", type=_positive_int, default=defaults.model.z_dim, help="latent size")
    t.add_argument("--hidden", type=_widths, default=defaults.model.hidden,
                   help="hidden widths, e.g. 400 or 200,200 (decoder mirrors encoder)")
    t.add_argument("--activation", default=defaults.model.activation, help="hidden nonlinearity")
    t.add_argument("--batch-size", type=_positive_int, default=defaults.train.batch_size)
    t.add_argument("--lr", type=_positive_float, default=defaults.train.lr, help="Adam learning rate")
    t.add_argument("--seed", type=int, default=defaults.train.seed)
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default=defaults.train.device)
    t.add_argument("--objective", default=defaults.train.objective, help="trace_elbo, meanfield_elbo, manual_analytic or manual_mc")
    t.add_argument("--binarization", default=defaults.data.binarization, help="dynamic or static")
    t.add_argument("--data-dir", default=None, help="data root (default: $PYROVAE_DATA, else ~/.cache/pyrovae)")
    t.add_argument("--train-subset", type=_positive_int, default=None, help="train on the first N images only")
    t.add_argument("--test-subset", type=_positive_int, default=None, help="evaluate on the first N test images")
    t.add_argument("--out", default=None, help="run folder (default: runs/mnist-<date>-<time>)")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar, no per-epoch lines")

    e = sub.add_parser("evaluate", help="test metrics of a checkpoint")
    e.add_argument("checkpoint", help="checkpoint.pt of a run, or the run folder")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--out", default=None, help="metrics JSON file (default: evaluation.json beside the checkpoint)")

    s = sub.add_parser("sample", help="decode samples from the prior of a checkpoint")
    s.add_argument("checkpoint", help="checkpoint.pt of a run, or the run folder")
    s.add_argument("--out", required=True, help="folder for samples.png")
    s.add_argument("--n", type=_positive_int, default=64, help="number of samples")
    s.add_argument("--seed", type=int, default=0)
    return parser


def _train(args) -> int:
    from pyrovae.run import train_run

    config = Config.from_dict({
        "model": {"z_dim": args.z_dim, "hidden": list(args.hidden), "activation": args.activation},
        "data": {"data_dir": args.data_dir, "binarization": args.binarization},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                  "device": args.device, "objective": args.objective,
                  "train_subset": args.train_subset, "test_subset": args.test_subset},
    })
    out = Path(args.out or f"runs/mnist-{datetime.now():%Y%m%d-%H%M%S}")
    metrics = train_run(config, out, quiet=args.quiet, overwrite=args.overwrite)
    last = metrics["epochs"][-1]
    print(f"test -ELBO {last['test_neg_elbo']:.2f} nats/image after {last['epoch']} epochs; outputs in {out}")
    return 0


def _evaluate(args) -> int:
    from pyrovae.checkpoint import load_vae
    from pyrovae.evaluate import evaluate
    from pyrovae.run import prepare_data, provenance, write_json
    from pyrovae.train import resolve_device

    device = resolve_device(args.device)
    vae, config, state = load_vae(args.checkpoint, map_location=device)
    if args.data_dir:
        config = config.replace(data={"data_dir": args.data_dir})
    _, test_binary, _ = prepare_data(config, device)
    metrics = evaluate(vae, test_binary, seed=config.data.test_binarization_seed)
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "evaluation.json"
    write_json(out, {"checkpoint": str(ckpt), "epoch": state["epoch"], "test": metrics,
                     "units": "nats per image; test set binarized once with a fixed seed", **provenance(device)})
    print(f"test -ELBO {metrics['neg_elbo']:.3f} nats/image  (reconstruction {metrics['reconstruction']:.3f}, "
          f"KL {metrics['kl']:.3f}) on {metrics['images']} images; written to {out}")
    return 0


def _sample(args) -> int:
    import torch

    from pyrovae import plots
    from pyrovae.checkpoint import load_vae

    vae, _, _ = load_vae(args.checkpoint)
    vae.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    path = plots.image_grid(vae.sample(args.n), out / "samples.png", nrow=min(args.n, 8),
                            title="E[x|z], z ~ p(z)")
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = {"train": _train, "evaluate": _evaluate, "sample": _sample}[args.command]
    try:
        return command(args)
    except ConfigError as e:
        parser.error(str(e))
    except USER_ERRORS as e:
        print(f"pyrovae {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pyrovae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
