"""Run folders: one training run, config in, a folder of outputs out; resumable, and safe to interrupt.

A run folder holds ``config.json``, ``metrics.json`` (per epoch, and provenance), ``checkpoint.pt``,
``loss_curve.png``, ``reconstructions.png``, ``samples.png``, and for a 2-D latent space
``manifold.png`` and ``latent_scatter.png``.

This module creates, refuses and resumes folders and writes what they hold; the loop itself is
:func:`pyrovae.engine.fit`, which writes the checkpoint it is given (after every epoch, every
``train.checkpoint_every_steps`` steps, at the step budget and on SIGINT/SIGTERM), atomically. A run
trained in pieces (``train_run(..., resume=True)``) has the same parameters and metrics as one
trained straight through.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pyro
import torch

from pyrovae.atomic import atomic_write
from pyrovae.checkpoint import CheckpointError, load_checkpoint
from pyrovae.config import Config
from pyrovae.checkpoint import load_vae
from pyrovae.data import Prepared, prepare_data, prepare_test
from pyrovae.engine import Interrupted, TrainState, fit, make_optimizer, resolve_device
from pyrovae.evaluate import active_units, evaluate, importance_log_likelihood, seeded_noise
from pyrovae.model import VAE, build_vae
from pyrovae.objectives import build_objective

__all__ = ["RunFolderError", "TrainedRun", "train_run", "evaluate_run", "provenance", "write_json", "write_figures",
           "run_metrics"]


class RunFolderError(FileExistsError):
    """The output folder already holds another run."""


def provenance(device: torch.device | str | None = None) -> dict:
    """Versions, device, git commit and command line, saved beside every result."""
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "pyro": pyro.__version__, "torchvision": torchvision.__version__},
        "device": str(device) if device is not None else None,
        "cpu_threads": torch.get_num_threads(),
        "git_commit": commit,
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def write_json(path, obj) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def run_metrics(config: Config, state: TrainState, data: Prepared, device: torch.device) -> dict:
    """``metrics.json``: the config, provenance, what the data are, and one row per finished epoch."""
    metrics = {"config": config.to_dict(), "seed": config.train.seed, **provenance(device),
               "units": "nats per image (bits/dim for 8-bit likelihoods)",
               "data": {"kind": data.kind, **({"train_binarization": config.data.binarization,
                        "test_binarization": "once, seed data.test_binarization_seed"} if data.kind == "binary"
                        else {"inputs": "grey levels / 255"})},
               "epochs": state.history}
    if state.epoch_step:  # the step budget (or a signal) ended the run inside an epoch
        metrics["stopped_at_step"] = state.step
    return metrics


class TrainedRun(NamedTuple):
    """What :func:`train_run` gives back: the trained model, its figures and the data it saw."""

    vae: VAE
    metrics: dict  # as in metrics.json
    config: Config
    data: Prepared


def train_run(config: Config | None, out_dir, *, quiet: bool = False, overwrite: bool = False,
              download: bool = True, resume: bool = False, data: Prepared | None = None, log=print) -> TrainedRun:
    """Train the configured VAE and write every output into ``out_dir``; returns the trained run.

    With ``resume=True`` the run in ``out_dir`` continues from its checkpoint; ``config`` (may be
    None) then only sets a new budget, ``train.epochs`` counting all epochs. ``data`` replaces the
    configured dataset (tensors already prepared, e.g. synthetic ones).
    """
    out = Path(out_dir)
    saved = load_checkpoint(out / "checkpoint.pt") if resume else None
    config = _resumable_config(out, config, saved) if resume else config
    if not resume:
        _check_out_dir(out, overwrite)
    device = resolve_device(config.train.device)
    data = data if data is not None else prepare_data(config, device, download)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        config.save(out / "config.json")

    pyro.set_rng_seed(config.train.seed)  # initialization and reparameterization noise
    vae = build_vae(config.model, tuple(data.train.shape[1:])).to(device)
    loss_fn = build_objective(config.train.objective, vae, config.train.particles)
    optimizer = make_optimizer(vae.parameters(), config.train.lr, device)
    state = None
    if saved is not None:
        vae.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState.from_dict(saved["state"], device)
    try:
        state = fit(config, vae, loss_fn, optimizer, data, state, checkpoint=out / "checkpoint.pt", quiet=quiet,
                    log=log)
    except Interrupted as e:
        resumed = load_checkpoint(out / "checkpoint.pt")["state"]
        write_json(out / "metrics.json", run_metrics(config, TrainState.from_dict(resumed, device), data, device))
        raise Interrupted(e.signum, f"{e}. Resume with: pyrovae train --resume {out} "
                                    f"--epochs {config.train.epochs}") from None
    metrics = run_metrics(config, state, data, device)
    write_json(out / "metrics.json", metrics)
    write_figures(vae, out, state.history, data.test, data.test_labels, seed=config.train.seed)
    return TrainedRun(vae.eval(), metrics, config, data)


def evaluate_run(checkpoint, *, device: str = "auto", data_dir: str | None = None, particles: int | None = None,
                 test_images: int | None = None, out=None) -> dict:
    """Test figures of a saved run: -ELBO and its terms, active units, and with ``particles`` = K the
    importance-sampled -log p(x) (IWAE-K), on the first ``test_images`` test images (all by default).
    Written as JSON to ``out`` when given. Only the test split is read."""
    device = resolve_device(device)
    vae, config, saved = load_vae(checkpoint, map_location=device)
    vae.eval()
    if data_dir:
        config = config.replace(data={"data_dir": data_dir})
    test, _ = prepare_test(config, device)
    test = test[:test_images] if test_images else test
    figures = {**evaluate(vae, test, seed=config.data.test_binarization_seed),
               "active_units": active_units(vae, test)["active_units"], "z_dim": config.model.z_dim}
    if particles:
        start = time.perf_counter()
        iwae = importance_log_likelihood(vae, test, k=particles)
        figures.update({"neg_log_likelihood": iwae["neg_log_likelihood"], "particles": particles,
                        "iwae_seconds": time.perf_counter() - start,
                        **({"iwae_bits_per_dim": iwae["bits_per_dim"]} if "bits_per_dim" in iwae else {})})
    result = {"checkpoint": str(checkpoint), "epoch": saved["state"]["epoch"], "step": saved["state"]["step"],
              "test": figures, "units": "nats per image (bits/dim for 8-bit likelihoods); binary data: test set "
                                        "binarized once with a fixed seed", **provenance(device)}
    if out is not None:
        write_json(out, result)
    return result


def _check_out_dir(out: Path, overwrite: bool) -> None:
    markers = [p for p in ("config.json", "metrics.json", "checkpoint.pt") if (out / p).exists()]
    if markers and not overwrite:
        raise RunFolderError(
            f"{out} already holds a run ({', '.join(markers)}); choose another --out folder, "
            "resume it with --resume, or pass --overwrite to replace it"
        )


def _resumable_config(out: Path, config: Config | None, state: dict) -> Config:
    """The saved config, with the training budget (epochs, max_steps) taken from ``config``."""
    saved = Config.from_dict(state["config"])
    if config is None:
        return saved
    budget = {"epochs": config.train.epochs, "max_steps": config.train.max_steps}
    mine = config.replace(train={"epochs": saved.train.epochs, "max_steps": saved.train.max_steps})
    if mine != saved:
        a, b = _flat(saved.to_dict()), _flat(mine.to_dict())
        diff = [f"{k}: saved {a.get(k)!r}, given {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise CheckpointError(f"cannot resume {out}: its config differs from the one given ({'; '.join(diff)}); "
                              "only the budget (train.epochs, train.max_steps) may change on resume")
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
    if vae.prior().event_shape == (2,):
        plots.manifold_grid(vae, out / "manifold.png")
        codes = torch.cat([vae.encode(test_binary[i:i + 1000]) for i in range(0, len(test_binary), 1000)])
        plots.latent_scatter(codes, test_labels, out / "latent_scatter.png")
