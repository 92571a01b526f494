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
import importlib
import os
import signal
import sys
from datetime import datetime
from pathlib import Path

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


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 1e-3, got {text!r}") from None


def _widths(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(part) for part in text.replace(",", " ").split())


def config_flags() -> list[tuple[str, str, dataclasses.Field]]:
    """(flag, section, field) for every config field that a ``pyrovae train`` flag sets: read off the
    fields' metadata (:func:`pyrovae.config.option`), in the sections' order."""
    flags = []
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag")
            if flag:
                flags.append((flag if isinstance(flag, str) else "--" + f.name.replace("_", "-"), section, f))
    return flags


def _add_config_flag(parser, flag: str, section: str, f: dataclasses.Field) -> None:
    """One flag for one config field: parsed by the field's type, ranges left to the config's own checks
    (which name the field). Its help is the field's documentation and default."""
    default = f.default if f.default is not dataclasses.MISSING else None
    default = ",".join(map(str, default)) if isinstance(default, tuple) else default
    shown = f"{section}.{f.name}" + ("" if default in (None, "") else f"; default {default}")
    kinds = {"bool": dict(action="store_true"), "int": dict(type=_integer, metavar="N"),
             "float": dict(type=_number, metavar="X"), "str": dict(metavar="NAME"),
             "tuple[int": dict(type=_widths, metavar="N,N"), "tuple[str": dict(action="append", metavar="NAME")}
    kind = next(v for k, v in kinds.items() if f.type.split(" |")[0].startswith(k))
    kind = {**kind, "metavar": "DIR"} if f.name.endswith("_dir") else kind
    parser.add_argument(flag, dest=f"{section}.{f.name}", default=None, help=f"{f.metadata['doc']} ({shown})", **kind)


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``pyrovae train``'s config flags come from the config's fields (:func:`config_flags`)."""
    parser = _Parser(prog="pyrovae", description="Variational autoencoders as Pyro programs.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a VAE with SVI and write a run folder",
                       description="Flags override --config, and --set overrides both. Every flag sets one field "
                                   "of pyrovae.config.Config; --set reaches the others.")
    t.add_argument("--config", help="a TOML (or JSON) config file, e.g. experiments/configs/mnist.toml")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set model.prior=vamp (repeatable)")
    for flag, section, f in config_flags():
        _add_config_flag(t, flag, section, f)
    t.add_argument("--out", default=None, help="run folder (default: runs/mnist-<date>-<time>)")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue this run to --epochs epochs in all")
    t.add_argument("--quiet", action="store_true", help="no progress bar, no per-epoch lines")
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


#: the config fields a --resume may set: its budget, and where the data are now
RESUME_FIELDS = ("train.epochs", "train.max_steps", "train.max_seconds", "data.data_dir")


def config_from_args(args) -> Config:
    """--config file, then flags, then --set overrides."""
    d = read_config_file(args.config) if args.config else {}
    for _, section, f in config_flags():
        value = getattr(args, f"{section}.{f.name}")
        if value is not None:
            d.setdefault(section, {})[f.name] = list(value) if isinstance(value, tuple) else value
    return Config.from_dict(apply_overrides(d, args.set))


def _train(args) -> int:
    from pyrovae.runs import train_run

    if args.resume:
        config, out, data_dir = _resumed(args)
        if config is None:
            return 0  # nothing to do: said so
    else:
        from pyrovae.build import check_names

        config, data_dir = config_from_args(args), None
        check_names(config)  # before a folder is made or other processes are joined
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

    given = {f"{section}.{f.name}": flag for flag, section, f in config_flags()
             if getattr(args, f"{section}.{f.name}") is not None}
    changed = [flag for key, flag in given.items() if key not in RESUME_FIELDS] + \
              (["--config"] if args.config else []) + (["--set"] if args.set else []) + (["--out"] if args.out else [])
    if changed:
        raise ConfigError(f"--resume continues a run with its saved config; only --epochs, --max-steps, --max-seconds "
                          f"and --data-dir may be given with it, not {', '.join(changed)}")
    epochs, max_steps, max_seconds, data_dir = (getattr(args, key) for key in RESUME_FIELDS)
    out = Path(args.resume)
    out = out.parent if out.is_file() else out  # the run folder, or its checkpoint.pt
    check_destination(out, resume=True)
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    saved = Config.from_dict(checkpoint["config"])
    config = saved.replace(train={  # --max-steps counts all steps; a time budget is per command, kept unless given
        "epochs": saved.train.epochs if epochs is None else epochs, "max_steps": max_steps,
        "max_seconds": saved.train.max_seconds if max_seconds is None else max_seconds})
    idle = _nothing_to_do(out, checkpoint["state"], config.train)
    if idle:
        if not _rank_prefix():
            print(idle)
        return None, out, None
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


@contextlib.contextmanager
def _interrupts_held():
    """Hold Ctrl-C while the libraries load, and raise it once they have.

    Loading torch runs C++ start-up code that calls back into Python; a KeyboardInterrupt raised
    inside such a call cannot unwind through C++, and the process aborts (SIGABRT, "terminate called
    after throwing an instance of 'pybind11::error_already_set'") instead of ending with one line.
    The wait is the rest of the import, a second or two. Off the main thread, where no signal
    handler can be set, nothing is held."""
    held: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)  # before torch and Pyro are loaded: a mistake is told at once
    with _interrupts_held():
        from pyrovae.engine import Interrupted

        importlib.import_module("pyrovae.runs")  # with torch and Pyro, torchvision and the rest

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
