"""Command line: ``pyrovae train | evaluate CKPT | sample CKPT`` (also ``python -m pyrovae``).

Importing this module loads neither torch nor Pyro: they and the rest of pyrovae are imported
inside :func:`main`, after the command line is parsed (a mistake in it is told at once), so that
Ctrl-C while they load (the first seconds) ends the command with one line and exit status 130, as
it does later.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

from pyrovae.atomic import StorageError
from pyrovae.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, apply_overrides, read_config_file

__all__ = ["main", "build_parser"]


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: printed as one message, no traceback."""
    from pyrovae.checkpoint import CheckpointError
    from pyrovae.data import DatasetNotFoundError
    from pyrovae.distributed import CollectiveError
    from pyrovae.engine import DeviceUnavailableError, NonFiniteLossError
    from pyrovae.folders import FolderInUseError
    from pyrovae.likelihoods import DataSupportError
    from pyrovae.model import ImageShapeError
    from pyrovae.runs import RunFolderError

    return (ConfigError, CheckpointError, DatasetNotFoundError, DataSupportError, ImageShapeError, RunFolderError,
            DeviceUnavailableError, NonFiniteLossError, StorageError, CollectiveError, FolderInUseError)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and a pointer to --help, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def _defaults() -> SimpleNamespace:
    """The config's defaults (``d.train.epochs``) read off its dataclasses, without building (and so
    checking) a Config, which would load the registries and with them torch."""
    def plain(cls):
        return SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(cls)
                                  if f.default is not dataclasses.MISSING})
    return SimpleNamespace(model=plain(ModelConfig), data=plain(DataConfig), train=plain(TrainConfig))


def _objectives_help(listed: bool) -> str:
    """The help of --objective; with ``listed``, the objectives' names (their module loads torch and Pyro)."""
    if not listed:  # the names come from pyrovae.objectives, which loads torch and Pyro: only for --help
        return "the loss, by name (see --help)"
    from pyrovae.objectives import ESTIMATORS

    return "the estimator: " + ", ".join(ESTIMATORS)


def build_parser(list_objectives: bool = True) -> argparse.ArgumentParser:  # False: parsed without torch
    parser = _Parser(prog="pyrovae", description="Variational autoencoders as Pyro programs.")
    sub = parser.add_subparsers(dest="command", required=True)

    d = _defaults()
    t = sub.add_parser("train", help="train a VAE with SVI and write a run folder",
                       description="Flags override --config, and --set overrides both. Defaults: "
                                   "pyrovae.config.Config.")
    t.add_argument("--config", help="a TOML (or JSON) config file, e.g. experiments/configs/mnist.toml")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set model.prior=vamp (repeatable)")
    t.add_argument("--epochs", type=_positive_int, help=f"passes over the training set ({d.train.epochs})")
    t.add_argument("--z-dim", type=_positive_int, help=f"latent size ({d.model.z_dim})")
    t.add_argument("--hidden", type=_widths, help="hidden widths, e.g. 400 or 200,200 (decoder mirrors encoder)")
    t.add_argument("--latents", type=_widths, help="a stack of stochastic layers, bottom first, e.g. 100,50 "
                                                    "(replaces --z-dim; default: one layer)")
    t.add_argument("--inference", choices=["top_down", "bottom_up"], help="the guide of a stack (top_down)")
    t.add_argument("--activation", help=f"hidden nonlinearity ({d.model.activation})")
    t.add_argument("--prior", help=f"p(z) by name ({d.model.prior})")
    t.add_argument("--likelihood", help=f"p(x|z) by name ({d.model.likelihood})")
    t.add_argument("--posterior", help=f"q(z|x), the guide's family, by name ({d.model.posterior})")
    t.add_argument("--network", help=f"encoder/decoder by name ({d.model.network})")
    t.add_argument("--batch-size", type=_positive_int, help=f"images per step ({d.train.batch_size})")
    t.add_argument("--lr", type=_positive_float, help=f"Adam learning rate ({d.train.lr})")
    t.add_argument("--seed", type=int, help=f"random seed ({d.train.seed})")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help=f"({d.train.device})")
    t.add_argument("--objective", help=f"{_objectives_help(list_objectives)} ({d.train.objective})")
    t.add_argument("--implementation", help=f"traced, pyro or manual ({d.train.implementation})")
    t.add_argument("--binarization", help="dynamic or static (MNIST training images)")
    t.add_argument("--dataset", help="mnist, fashion_mnist, cifar10, lfw, or folder:PATH")
    t.add_argument("--image-size", type=_positive_int, help="resize and centre-crop images to NxN")
    t.add_argument("--data-dir", help="data root (default: $PYROVAE_DATA, else ~/.cache/pyrovae)")
    t.add_argument("--train-subset", type=_positive_int, help="train on the first N images only")
    t.add_argument("--test-subset", type=_positive_int, help="evaluate on the first N test images")
    t.add_argument("--particles", type=_positive_int, help=f"K for the iwae objectives ({d.train.particles})")
    t.add_argument("--kl-weight", type=float, help="beta, the weight of the KL term (1: the ELBO)")
    t.add_argument("--kl-warmup-steps", type=int, help="raise the KL weight from 0 over N steps")
    t.add_argument("--max-steps", type=_positive_int, help="stop after N optimizer steps in all")
    t.add_argument("--grad-clip", type=_positive_float, help="clip the gradient norm to this value")
    t.add_argument("--checkpoint-every", type=_positive_int, help="also checkpoint every N steps")
    t.add_argument("--out", default=None, help="run folder (default: runs/mnist-<date>-<time>)")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue this run to --epochs epochs in all")
    t.add_argument("--quiet", action="store_true", help="no progress bar, no per-epoch lines")
    t.add_argument("--tensorboard", action="store_true", default=None,
                   help="also log to RUN/tensorboard for `tensorboard --logdir` (needs the tensorboard package)")
    plugin_help = "import this module first: it adds priors, likelihoods, posteriors or networks by name (repeatable)"
    t.add_argument("--plugin", action="append", default=None, metavar="MODULE", help=plugin_help)

    _add_evaluate_and_sample(sub)
    return parser


def _add_evaluate_and_sample(sub) -> None:
    e = sub.add_parser("evaluate", help="test metrics of a checkpoint")
    e.add_argument("checkpoint", help="checkpoint.pt of a run, or the run folder")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--out", default=None, help="metrics JSON file (default: evaluation.json beside the checkpoint)")
    e.add_argument("--particles", type=_positive_int, default=None, metavar="K",
                   help="also estimate -log p(x) by importance sampling with K particles per image (IWAE-K)")

    s = sub.add_parser("sample", help="decode samples from the prior of a checkpoint")
    s.add_argument("checkpoint", help="checkpoint.pt of a run, or the run folder")
    s.add_argument("--out", required=True, help="folder for samples.png")
    s.add_argument("--n", type=_positive_int, default=64, help="number of samples")
    s.add_argument("--seed", type=int, default=0)


#: train flags and the config fields they set
FLAG_FIELDS = {
    "epochs": "train.epochs", "z_dim": "model.z_dim", "hidden": "model.hidden", "latents": "model.latents", "inference": "model.inference",
    "activation": "model.activation", "prior": "model.prior", "likelihood": "model.likelihood",
    "posterior": "model.posterior", "network": "model.network", "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
    "device": "train.device", "objective": "train.objective", "implementation": "train.implementation", "binarization": "data.binarization",
    "data_dir": "data.data_dir", "dataset": "data.dataset", "image_size": "data.image_size", "train_subset": "train.train_subset", "test_subset": "train.test_subset",
    "max_steps": "train.max_steps", "grad_clip": "train.grad_clip", "particles": "train.particles",
    "kl_weight": "train.kl_weight", "kl_warmup_steps": "train.kl_warmup_steps",
    "checkpoint_every": "train.checkpoint_every_steps", "tensorboard": "train.tensorboard", "plugin": "model.plugins",
}
RESUME_FLAGS = {"epochs", "max_steps", "data_dir"}  # a budget, and where the data are now


def config_from_args(args) -> Config:
    """--config file, then flags, then --set overrides."""
    d = read_config_file(args.config) if args.config else {}
    for flag, field in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            section, key = field.split(".")
            d.setdefault(section, {})[key] = list(value) if isinstance(value, tuple) else value
    return Config.from_dict(apply_overrides(d, args.set))


def _train(args) -> int:
    from pyrovae.runs import train_run

    if args.resume:
        config, out, data_dir = _resumed(args)
        if config is None:
            return 0  # nothing to do: said so
    else:
        config, data_dir = config_from_args(args), None
    world = _join(config.train.device)
    made = []  # folders this command made for the run: removed again if it fails to start
    if not args.resume:
        out, made = _run_folder(args.out, config, world)
    try:
        metrics = train_run(config, out, quiet=args.quiet, overwrite=args.overwrite, resume=bool(args.resume),
                            data_dir=data_dir, world=world).metrics
    except BaseException:
        from pyrovae.folders import remove_if_empty

        for folder in made if world.main else ():  # innermost first; a folder still holding files stays
            remove_if_empty(folder)
        raise
    if world.main:  # even with --quiet: where the run went
        last = metrics["epochs"][-1] if metrics["epochs"] else None
        done = (f"test -ELBO {last['test_neg_elbo']:.2f} nats/image after {last['epoch']} epochs" if last else
                f"stopped after {metrics.get('stopped_at_step', 0)} steps, before the first epoch ended (no test "
                "figures yet)")
        print(f"{done}; outputs in {out}")
    return 0


def _run_folder(given, config: Config, world) -> tuple[Path, list[Path]]:
    """--out as given, or a new runs/<dataset>-<date>-<time> (-2, -3, ... when two runs start in the same
    second), made now; returns it and the folders made for it (innermost first)."""
    if given:
        return Path(given), []
    from pyrovae.folders import fresh_folder

    base = Path(f"runs/{config.data.dataset.split(':')[0]}-{datetime.now():%Y%m%d-%H%M%S}")
    parent_made = not base.parent.is_dir()
    out = world.from_main(lambda: fresh_folder(base))
    return out, [out, base.parent] if parent_made else [out]


def _resumed(args) -> tuple[Config | None, Path, str | None]:
    """(config, run folder, data folder) of a --resume; config None when the run has nothing left to do."""
    from pyrovae.checkpoint import load_checkpoint
    from pyrovae.runs import check_destination

    changed = [f"--{f.replace('_', '-')}" for f in FLAG_FIELDS if f not in RESUME_FLAGS
               and getattr(args, f) is not None] + (["--config"] if args.config else []) + \
              (["--set"] if args.set else []) + (["--out"] if args.out else [])
    if changed:
        raise ConfigError(f"--resume continues a run with its saved config; only --epochs, --max-steps and "
                          f"--data-dir may be given with it, not {', '.join(changed)}")
    out = Path(args.resume)
    out = out.parent if out.is_file() else out  # the run folder, or its checkpoint.pt
    check_destination(out, resume=True)
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    saved = Config.from_dict(checkpoint["config"])
    config = saved.replace(train={"epochs": args.epochs or saved.train.epochs, "max_steps": args.max_steps})
    idle = _nothing_to_do(out, checkpoint["state"], config.train)
    if idle:
        if not _rank_prefix():
            print(idle)
        return None, out, None
    data_dir = args.data_dir
    if data_dir is None and saved.data.data_dir and not Path(saved.data.data_dir).is_dir():
        data_dir = os.environ.get("PYROVAE_DATA")  # the saved location is gone: look where the user says
    return config, out, data_dir


def _nothing_to_do(out: Path, state: dict, t) -> str | None:
    """What to say when a resume's budget is spent already; None when there are steps to take."""
    if state["epoch"] >= t.epochs:
        return (f"nothing to do: {out} has finished {state['epoch']} epochs, and --epochs counts all epochs "
                f"({t.epochs}); give a larger --epochs to train it further")
    if t.max_steps is not None and state["step"] >= t.max_steps:
        return (f"nothing to do: {out} has taken {state['step']} steps, and --max-steps counts all steps "
                f"({t.max_steps}); give a larger --max-steps to train it further")
    return None


def _evaluate(args) -> int:
    from pyrovae.folders import check_writable, claimed
    from pyrovae.runs import evaluate_run, write_json

    ckpt = Path(args.checkpoint)
    run = ckpt if ckpt.is_dir() else ckpt.parent
    out = Path(args.out) if args.out else run / "evaluation.json"
    world = _join(args.device)
    in_run = ckpt.exists() and out.parent.resolve() == run.resolve()  # then the run folder is locked
    if ckpt.exists() and not in_run:
        world.from_main(lambda: check_writable(out))  # before any work
    with claimed(run, world=world) if in_run else contextlib.nullcontext():
        result = evaluate_run(ckpt, device=args.device, data_dir=args.data_dir, particles=args.particles,
                              world=world)
        if world.main:
            _print_figures(result["test"], args.particles)
        try:
            world.from_main(lambda: write_json(out, result))
        except StorageError as e:
            raise StorageError(e.errno, f"{e}. The figures are printed above") from None
    if world.main:
        print(f"written to {out}")
    return 0


def _print_figures(metrics: dict, particles: int | None) -> None:
    print(f"test -ELBO {metrics['neg_elbo']:.3f} nats/image  (reconstruction {metrics['reconstruction']:.3f}, "
          f"KL {metrics['kl']:.3f}) on {metrics['images']} images; {metrics['active_units']} active units")
    if particles:
        print(f"test -log p(x) {metrics['neg_log_likelihood']:.3f} nats/image (importance sampling, "
              f"K={particles} particles)")


def _sample(args) -> int:
    import torch

    from pyrovae import plots
    from pyrovae.checkpoint import load_vae
    from pyrovae.folders import claimed

    with claimed(args.out, create=True):  # made (if need be) and locked before the checkpoint is read
        vae, _, _ = load_vae(args.checkpoint)
        vae.eval()
        torch.manual_seed(args.seed)
        path = plots.image_grid(vae.sample(args.n), Path(args.out) / "samples.png", nrow=min(args.n, 8),
                                title="E[x|z], z ~ p(z)")
    print(f"wrote {path}")
    return 0


def _join(device: str):
    """Under torchrun, join the other processes (gloo on the CPU, NCCL on CUDA); else one process."""
    from pyrovae import distributed
    from pyrovae.engine import resolve_device

    return distributed.start(resolve_device(device))[0] if distributed.launched() else distributed.World()


def _rank_prefix() -> str:
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else "0"
    return f"[rank {rank}] " if rank != "0" else ""


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (1: an error of the user's, 2: a bad command line,
    128 + N: stopped by signal N)."""
    try:
        return _guarded(argv)
    except KeyboardInterrupt:  # Ctrl-C while torch and Pyro load, before the command handles it itself
        print("pyrovae: interrupted", file=sys.stderr)
        return 130


def _guarded(argv: list[str] | None) -> int:
    try:
        code = _main(argv)
    except BaseException:
        _stop()
        raise
    if _stop():  # torchrun made a process group: end without the interpreter's shutdown (see exit_now)
        sys.modules["pyrovae.distributed"].exit_now(code)
    return code


def _stop() -> bool:
    """Leave the process group, if torchrun made one (none was made unless pyrovae.distributed was loaded)."""
    distributed = sys.modules.get("pyrovae.distributed")
    return distributed.stop() if distributed is not None else False


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(list_objectives=any(a in ("-h", "--help") for a in argv))
    args = parser.parse_args(argv)  # before torch and Pyro are loaded: a mistake is told at once
    from pyrovae.engine import Interrupted

    command = {"train": _train, "evaluate": _evaluate, "sample": _sample}[args.command]
    try:
        return command(args)
    except ConfigError as e:
        parser.exit(2, f"pyrovae {args.command}: error: {e} (see pyrovae {args.command} --help)\n")
    except _user_errors() as e:
        print(f"{_rank_prefix()}pyrovae {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the file system refused: say which file, without a traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"{_rank_prefix()}pyrovae {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except Interrupted as e:
        if not _rank_prefix():
            print(f"pyrovae {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{_rank_prefix()}pyrovae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
