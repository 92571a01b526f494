"""Run folders: one training run, config in, a folder of outputs out; resumable, and safe to interrupt.

A run folder holds ``config.json``, ``metrics.json`` (per epoch, and provenance), ``checkpoint.pt``,
``loss_curve.png``, ``reconstructions.png``, ``samples.png``, and for a 2-D latent space
``manifold.png`` and ``latent_scatter.png``.

This module creates, refuses and resumes folders and writes what they hold; the loop itself is
:func:`pyrovae.engine.fit`, which hands its state to the :class:`pyrovae.checkpoint.Checkpointer`
made here (after every epoch, every ``train.checkpoint_every_steps`` steps, at the step budget and
on SIGINT/SIGTERM); rank 0 writes the file atomically and every process waits for it. A run
trained in pieces (``train_run(..., resume=True)``) has the same parameters and metrics as one
trained straight through.
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import pyro
import torch

from pyrovae.atomic import make_folder, remove_temporaries, storage_error, write_json
from pyrovae.provenance import machine, provenance  # noqa: F401  (part of this module's interface too)
from pyrovae.board import Board
from pyrovae.checkpoint import Checkpointer, CheckpointError, load_checkpoint, vae_from_checkpoint
from pyrovae.config import Config, ConfigError
from pyrovae.data import Prepared, expected_image_shape, fingerprint, prepare_data, prepare_test
from pyrovae.distributed import World, on_main, wrap
from pyrovae.engine import Interrupted, fit, make_optimizer, resolve_device
from pyrovae.evaluate import active_units, evaluate, importance_log_likelihood, seeded_noise
from pyrovae.folders import LOCK_NAME, claimed
from pyrovae.build import build_vae, check_names
from pyrovae.model import VAE
from pyrovae.objectives import build_objective
from pyrovae.state import TrainState, summed
from pyrovae.stream import epoch_batches

__all__ = ["RunFolderError", "TrainedRun", "train_run", "evaluate_run", "provenance", "machine", "write_json",
           "write_figures", "run_metrics"]


class RunFolderError(FileExistsError):
    """The output folder already holds another run."""


def run_metrics(config: Config, state: TrainState, data: Prepared, device: torch.device, world_size: int = 1) -> dict:
    """``metrics.json``: the config, provenance, what the data are, and one row per finished epoch.
    ``state`` holds the sums of all processes (as a checkpoint does, or :func:`pyrovae.state.summed`)."""
    metrics = {"config": config.to_dict(), "seed": config.train.seed, **provenance(device),
               "world_size": world_size,
               "batch_size": {"global": config.train.batch_size,
                              "per_process": config.train.batch_size / world_size},
               "units": "nats per image (bits/dim for 8-bit likelihoods)",
               "data": {"kind": data.kind, **({"train_binarization": config.data.binarization,
                        "test_binarization": "once, seed data.test_binarization_seed"} if data.kind == "binary"
                        else {"inputs": "grey levels / 255"})},
               "epochs": state.history}
    if state.epoch_step:  # the step budget (or a signal) ended the run inside an epoch
        metrics["stopped_at_step"] = state.step
        metrics["partial_epoch"] = partial_epoch(state)
    return metrics


def partial_epoch(state: TrainState) -> dict:
    """The figures of an epoch the run stopped inside: its steps so far and their mean training loss."""
    return {"epoch": state.epoch + 1, "steps": state.epoch_step, "images": state.images,
            "train_neg_elbo": float(state.loss_sum) / max(state.images, 1)}


class TrainedRun(NamedTuple):
    """What :func:`train_run` gives back: the trained model, its figures and the data it saw."""

    vae: VAE
    metrics: dict  # as in metrics.json
    config: Config
    data: Prepared


def train_run(config: Config | None, out_dir, *, quiet: bool = False, overwrite: bool = False,
              download: bool = True, resume: bool = False, data: Prepared | None = None,
              data_dir: str | None = None, log=print, world: World = World()) -> TrainedRun:
    """Train the configured VAE and write every output into ``out_dir``; returns the trained run.

    With ``resume=True`` the run in ``out_dir`` continues from its checkpoint; ``config`` (may be
    None) then only sets a new budget, ``train.epochs`` counting all epochs, and ``data_dir`` says
    where the data are now (they must be the data the run was trained on). ``data`` replaces the
    configured dataset (tensors already prepared, e.g. synthetic ones).

    The folder is locked (:mod:`pyrovae.folders`) from before the data are read until the run ends:
    a second writer is refused. Everything that can be checked is checked before the data are read,
    and a run that fails before its first checkpoint removes what it wrote (``config.json``, and the
    folder if it made it): the folder is left as it was. The VAE is built and trained with Pyro's
    ``module_local_params`` setting: its parameters stay in the module, and Pyro's global parameter
    store is left as it was.
    """
    out = Path(out_dir)
    out = out.parent if resume and out.is_file() else out  # the run's checkpoint.pt names the run too
    if config is not None and not resume:
        check_names(config)  # before the folder is claimed: an unknown name leaves nothing behind
    check_destination(out, resume, world=world)
    advice = "a resumed run writes into its folder: copy the folder somewhere writable and resume the copy"
    with pyro.settings.context(module_local_params=True), \
            claimed(out, create=not resume, world=world, log=log, advice=advice if resume else None):
        try:
            if not resume:  # with the folder claimed: it holds no other run (unless --overwrite)
                _check_out_dir(out, overwrite, log, world=world)
            return _train_run(config, out, quiet=quiet, overwrite=overwrite, download=download, resume=resume,
                              data=data, data_dir=data_dir, log=log, world=world)
        except BaseException:
            if world.main and not resume:
                _forget_unsaved_run(out)
            raise


def _train_run(config, out: Path, *, quiet, overwrite, download, resume, data, data_dir, log, world) -> TrainedRun:
    quiet, log = quiet or not world.main, log if world.main else (lambda *_: None)
    saved = _saved_run(out, world=world) if resume else None
    config = _resumable_config(out, config, saved) if resume else config
    if resume:
        check_names(config)  # a plugin the saved run names, say, may be missing here
    if config.train.tensorboard:  # an optional feature, checked where it is used (by every process alike)
        from pyrovae.board import require_tensorboard

        require_tensorboard()
    if data_dir is not None:
        config = config.replace(data={"data_dir": str(data_dir)})
    device = _device(config, world)
    vae, data = _model_and_data(config, data, device, download)
    world.seed_noise(config.train.seed)
    _check_batch_size(config, data, log, world)
    identity = fingerprint(data)
    if saved is not None:
        _check_same_data(out, saved["state"].get("data"), identity)
    resumed = saved["state"].get("matmul") if saved is not None else None
    loss_fn, matmul = _loss_module(config, vae, data, device, world, log, resumed_matmul=resumed)
    optimizer = make_optimizer(vae.parameters(), config.train.lr, device)
    saver = Checkpointer(out / "checkpoint.pt", world)
    if saved is not None:
        state = _resumed(saved, identity, vae, optimizer, saver, device)
        state.matmul = matmul.backend
    else:
        state = TrainState.start(config.train.seed, device, identity, matmul=matmul.backend)
        _start_folder(out, config, overwrite, world=world)
    _remove_temporaries(out, world=world)  # left by a write that was killed
    board = Board(out / "tensorboard", start_step=state.step) if config.train.tensorboard and world.main else None
    try:
        state = fit(config, vae, loss_fn, optimizer, data, state, checkpoint=saver, quiet=quiet, log=log, board=board,
                    world=world)
    except Interrupted as e:
        _write_stopped_metrics(out, config, data, device, world.size, world=world)
        raise Interrupted(e.signum, f"{e}. Resume with: {_launcher(world)} train --resume {out} "
                                    f"--epochs {config.train.epochs}") from None
    finally:
        if board is not None:
            board.close()
    metrics = {**run_metrics(config, summed(state, world), data, device, world.size),
               "compile_seconds": _compile_seconds(loss_fn), "matmul": dict(matmul)}
    _write_outputs(out, metrics, vae, state, data, config.train.seed, world=world)
    vae.config = config
    return TrainedRun(vae.eval(), metrics, config, data)


def _model_and_data(config: Config, data: Prepared | None, device: torch.device, download: bool):
    """The VAE (built, and its option values checked, before the data are read where the image shape
    is known beforehand) and the prepared data."""
    shape = tuple(data.train.shape[1:]) if data is not None else expected_image_shape(config.data)
    vae = _build(config, shape, device) if shape is not None else None
    data = data if data is not None else prepare_data(config, device, download)
    if vae is None or vae.image_shape != tuple(data.train.shape[1:]):
        vae = _build(config, tuple(data.train.shape[1:]), device)
    return vae, data


def _resumed(saved: dict, identity: dict, vae, optimizer, saver: Checkpointer, device: torch.device) -> TrainState:
    """The module, optimizer and state of a checkpoint, loaded to go on with the data found now."""
    vae.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    for group in optimizer.param_groups:  # a run whose steps were CUDA graphs may go on elsewhere
        group["capturable"] = group.get("capturable", False) and device.type == "cuda"
    state = saver.resume(saved["state"], device)
    state.data = identity
    return state


@on_main
def _remove_temporaries(out: Path) -> None:
    remove_temporaries(out)


@on_main
def _write_stopped_metrics(out: Path, config: Config, data: Prepared, device: torch.device, world_size: int) -> None:
    """metrics.json of a run stopped by a signal, from its checkpoint (which holds the sums of all processes)."""
    saved = TrainState.from_dict(load_checkpoint(out / "checkpoint.pt")["state"], device)
    write_json(out / "metrics.json", run_metrics(config, saved, data, device, world_size))


@on_main
def _write_outputs(out: Path, metrics: dict, vae, state: TrainState, data: Prepared, seed: int) -> None:
    write_json(out / "metrics.json", metrics)
    write_figures(vae, out, state.history, data.test, data.test_labels, seed=seed)


def _loss_module(config: Config, vae: VAE, data: Prepared, device: torch.device, world: World, log,
                 resumed_matmul: str | None = None):
    """The objective the run trains through, and the matrix-product backend it uses: built, its
    linear layers sent to the backend ``train.matmul`` chooses (the checkpoint's, on resume),
    compiled where ``train.compile`` says so (both for the run's planned number of steps), and
    wrapped for data parallelism under torchrun."""
    from pyrovae.compiled import faster_loss
    from pyrovae.matmul import choose

    t = config.train
    if getattr(t, "old_name_note", None):
        log(t.old_name_note)
    loss_fn = build_objective(t.objective, vae, t.particles, t.free_bits, implementation=t.implementation)
    steps = _planned_steps(config, data)
    first = lambda: next(epoch_batches(data, t.batch_size, t.seed, 0, world=world))  # noqa: E731
    # rank 0 chooses (measuring alone, if it measures), and every process multiplies the same way
    matmul = world.from_main(lambda: choose(t.matmul, loss_fn, device, first, steps=steps, resumed=resumed_matmul,
                                            log=log))
    loss_fn = faster_loss(config.train, matmul.wrap(loss_fn), device, steps, log)
    if config.train.cuda_graph is True and device.type != "cuda":
        log("note: train.cuda_graph applies on CUDA only; this run is on the CPU and takes eager steps")
    return wrap(loss_fn, world, device), matmul


def _compile_seconds(loss_fn) -> float | None:
    """How long tracing and compiling the loss took in this command (None: it was not compiled)."""
    from pyrovae.compiled import TracedLoss

    traced = next((m for m in (loss_fn, getattr(loss_fn, "module", None)) if isinstance(m, TracedLoss)), None)
    return traced.seconds if traced is not None else None


def _planned_steps(config: Config, data: Prepared) -> int:
    """The steps the whole run takes by its budget (epochs, max_steps), counted from its start."""
    t = config.train
    planned = t.epochs * -(-data.train.shape[0] // t.batch_size)
    return min(planned, t.max_steps) if t.max_steps is not None else planned


def _device(config: Config, world: World) -> torch.device:
    device = resolve_device(config.train.device)
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.active else device


@on_main
def _start_folder(out: Path, config: Config, overwrite: bool) -> None:
    if overwrite:
        _clear_run(out)
    make_folder(out)
    write_json(out / "config.json", config.to_dict())


def _launcher(world: World) -> str:
    return f"torchrun --standalone --nproc_per_node {world.size} -m pyrovae" if world.active else "pyrovae"


def _build(config: Config, image_shape: tuple[int, ...], device: torch.device) -> VAE:
    """The configured VAE, initialized from the run's seed (the same draws whenever it is built)."""
    pyro.set_rng_seed(config.train.seed)  # initialization; reparameterization noise follows from it
    return build_vae(config.model, image_shape).to(device)


def _check_batch_size(config: Config, data: Prepared, log, world: World) -> None:
    n, batch = data.train.shape[0], config.train.batch_size
    if batch < world.size:
        raise ConfigError(f"train.batch_size {batch} is the global batch, shared out over {world.size} processes: "
                          f"it must be at least {world.size}")
    if batch > n:
        log(f"note: train.batch_size {batch} is larger than the {n} training images; every step uses all "
            f"{n} (full-batch training)")


def _check_same_data(out: Path, saved: dict | None, found: dict) -> None:
    """Resuming: the data found now must be the data the run was trained on."""
    if saved is None:  # a checkpoint older than the fingerprint: nothing to compare
        return
    if saved != found:
        what = [f"{k}: trained on {saved.get(k)}, found {found.get(k)}" for k in ("train_shape", "test_shape")
                if saved.get(k) != found.get(k)] or ["the same shapes, but different contents (SHA-256)"]
        raise CheckpointError(f"cannot resume {out}: the data found are not the data it was trained on "
                              f"({'; '.join(what)}). Point --data-dir (or PYROVAE_DATA) at the original data")


def evaluate_run(checkpoint, *, device: str = "auto", data_dir: str | None = None, particles: int | None = None,
                 test_images: int | None = None, out=None, world: World = World()) -> dict:
    """Test figures of a saved run: -ELBO and its terms, active units, and with ``particles`` = K the
    importance-sampled -log p(x) (IWAE-K), on the first ``test_images`` test images (all by default).
    Written as JSON to ``out`` when given. Only the test split is read. Under torchrun the processes
    share the test images out (rank 0 reads the checkpoint and writes the JSON); the figures equal
    the one-process figures, since the draws belong to the images."""
    device = _device(Config().replace(train={"device": device}), world)
    state = world.from_main(lambda: load_checkpoint(checkpoint, "cpu"))
    vae, config, saved = vae_from_checkpoint(state, checkpoint, device)
    vae.eval()
    if data_dir:
        config = config.replace(data={"data_dir": data_dir})
    test, _ = prepare_test(config, device)
    test = test[:test_images] if test_images else test
    units = active_units(vae, test)
    figures = {**evaluate(vae, test, seed=config.data.test_binarization_seed, world=world),
               "active_units": units["active_units"], "z_dim": units["z_dim"]}
    if "layers" in units:  # a stack: active units of each layer
        figures["active_units_per_layer"] = {name: layer["active_units"] for name, layer in units["layers"].items()}
    if particles:
        start = time.perf_counter()
        iwae = importance_log_likelihood(vae, test, k=particles, world=world)
        figures.update({"neg_log_likelihood": iwae["neg_log_likelihood"], "particles": particles,
                        "iwae_seconds": time.perf_counter() - start,
                        **({"iwae_bits_per_dim": iwae["bits_per_dim"]} if "bits_per_dim" in iwae else {})})
    result = {"checkpoint": str(checkpoint), "epoch": saved["state"]["epoch"], "step": saved["state"]["step"],
              "test": figures, "world_size": world.size,
              "units": "nats per image (bits/dim for 8-bit likelihoods); binary data: test set "
                       "binarized once with a fixed seed", **provenance(device)}
    if out is not None:
        world.from_main(lambda: write_json(out, result))
    return result


#: What a run writes into its folder; --overwrite removes exactly these.
RUN_OUTPUTS = ("config.json", "metrics.json", "checkpoint.pt", "evaluation*.json", "*.png", ".*.tmp", "tensorboard")


def _run_outputs(out: Path) -> tuple[list[Path], list[Path]]:
    """(the run's own files in ``out``, anything else there)."""
    if not out.is_dir():
        return [], []
    ours = {p for pattern in RUN_OUTPUTS for p in out.glob(pattern)}
    return sorted(ours), sorted(p for p in out.iterdir() if p not in ours and p.name != LOCK_NAME)


@on_main
def check_destination(out: Path, resume: bool) -> None:
    """Before the folder is claimed: a run to resume has a checkpoint; a new run's --out can be a folder."""
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise CheckpointError(
                f"no checkpoint in {out}: its run stopped before saving one; start it again without --resume"
                if (out / "config.json").is_file() else
                f"no checkpoint at {out / 'checkpoint.pt'}: give the run folder (or its checkpoint.pt)")
        return
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder; choose another --out")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise storage_error(out, OSError(errno.ENOTDIR, f"{blocking} is a file"))


@on_main
def _check_out_dir(out: Path, overwrite: bool, log=print) -> None:
    """With the folder claimed: it holds no other run (unless --overwrite), nor, then, files of the user's."""
    markers = [p for p in ("config.json", "metrics.json", "checkpoint.pt") if (out / p).exists()]
    if markers == ["config.json"] and not overwrite:
        log(f"note: {out} holds the config.json of a run that never saved a checkpoint; this run replaces it")
        return
    if markers and not overwrite:
        resume = "resume it with --resume, " if "checkpoint.pt" in markers else ""
        raise RunFolderError(f"{out} already holds a run ({', '.join(markers)}); choose another --out folder, "
                             f"{resume}or pass --overwrite to replace it")
    if markers:
        _, others = _run_outputs(out)
        if others:
            raise RunFolderError(
                f"--overwrite replaces the run in {out} as a whole, but the folder also holds files a run does not "
                f"write ({', '.join(p.name for p in others[:5])}{', ...' if len(others) > 5 else ''}); move them "
                "away or choose another --out")


def _forget_unsaved_run(out: Path) -> None:
    """A new run failed before its first checkpoint: remove what it wrote (made after its lock was)."""
    lock = out / LOCK_NAME
    if (out / "checkpoint.pt").exists() or not lock.is_file():
        return
    claimed_at = lock.stat().st_mtime_ns
    for path in (out / "config.json", out / "tensorboard"):
        if path.exists() and path.stat().st_mtime_ns >= claimed_at:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    remove_temporaries(out)


@on_main
def _saved_run(out: Path) -> dict:
    """The checkpoint of the run to resume, once its config.json is known to be the checkpoint's config."""
    saved = load_checkpoint(out / "checkpoint.pt")
    _check_config_file(out, saved["config"])
    return saved


#: The train fields a resume may change: the budget of the command, not the run's identity.
RESUME_BUDGET = ("epochs", "max_steps", "max_seconds")


def _check_config_file(out: Path, saved: dict) -> None:
    """A resume refuses a config.json edited since the run began: the checkpoint's config is the run's."""
    path = out / "config.json"
    if not path.is_file():
        return
    try:
        written = json.loads(path.read_text())
        model = written.get("model", {})
        for old, new in (("guide", "posterior"), ("guide_options", "posterior_options")):  # version-1 runs
            if old in model:
                model[new] = model.pop(old)
        written = _flat(Config.from_dict(written).to_dict())
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot resume {out}: its config.json cannot be read ({e}); restore it, or start "
                              "a new run") from None
    ours = _flat(Config.from_dict(saved).to_dict())
    budget = {f"train.{k}" for k in RESUME_BUDGET} | {"data.data_dir"}  # may change on resume
    diff = [f"{k}: checkpoint {ours.get(k)!r}, config.json {written.get(k)!r}"
            for k in sorted(set(ours) | set(written)) if k not in budget and ours.get(k) != written.get(k)]
    if diff:
        raise CheckpointError(
            f"cannot resume {out}: its config.json no longer matches the config saved in its checkpoint "
            f"({'; '.join(diff)}); a resume continues the run as it was saved. Undo the edit to config.json, "
            "or start a new run with the changed config (pyrovae train ... --out NEW)")


def _clear_run(out: Path) -> None:
    """Remove every output of the run in ``out`` (checked by :func:`_check_out_dir`), so none survives."""
    ours, _ = _run_outputs(out)
    for path in ours:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _resumable_config(out: Path, config: Config | None, state: dict) -> Config:
    """The saved config, with the training budget (epochs, max_steps, max_seconds) taken from ``config``."""
    saved = Config.from_dict(state["config"])
    if config is None:
        return saved
    budget = {k: getattr(config.train, k) for k in RESUME_BUDGET}
    mine = config.replace(train={k: getattr(saved.train, k) for k in RESUME_BUDGET},
                          data={"data_dir": saved.data.data_dir})  # where the data are is not the run's identity
    if mine != saved:
        a, b = _flat(saved.to_dict()), _flat(mine.to_dict())
        diff = [f"{k}: saved {a.get(k)!r}, given {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise CheckpointError(f"cannot resume {out}: its config differs from the one given ({'; '.join(diff)}); "
                              "only the budget (train.epochs, train.max_steps, train.max_seconds) may change on resume")
    return saved.replace(train=budget)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "data", "train"):
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


@torch.no_grad()
def write_figures(vae, out: Path, history, test_binary, test_labels, seed: int = 0) -> None:
    from pyrovae import plots

    vae.eval()
    if history:
        plots.loss_curve(history, out / "loss_curve.png", title="-ELBO per image")
    spread = torch.linspace(0, len(test_binary) - 1, min(16, len(test_binary))).long()  # folders sorted by class
    inputs = test_binary[spread.to(test_binary.device)]
    plots.image_grid(torch.cat([inputs, vae.reconstruct(inputs)]), out / "reconstructions.png", nrow=16,
                     title="test images (top) and reconstructions E[x|z=mean of q(z|x)] (bottom)")
    with seeded_noise(seed, test_binary.device):
        plots.image_grid(vae.sample(64), out / "samples.png", nrow=8, title="E[x|z], z ~ p(z)")
        if hasattr(vae, "latents"):  # a stack: what the top layer holds
            plots.layers_grid(vae, out / "layers.png")
    if not hasattr(vae, "latents") and vae.prior().event_shape == (2,):
        plots.manifold_grid(vae, out / "manifold.png")
        codes = torch.cat([vae.encode(test_binary[i:i + 1000]) for i in range(0, len(test_binary), 1000)])
        plots.latent_scatter(codes, test_labels, out / "latent_scatter.png")
