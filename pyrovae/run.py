"""A training run: config in, a folder of outputs out; resumable, and safe to interrupt.

Outputs: ``config.json``, ``metrics.json`` (per epoch and provenance), ``checkpoint.pt``,
``loss_curve.png``, ``reconstructions.png``, ``samples.png``, and for a 2-D latent space
``manifold.png`` and ``latent_scatter.png``.

The checkpoint is rewritten atomically after every epoch (and every ``train.checkpoint_every_steps``
steps). It holds the module and optimizer state, every random state (torch's, and the data order
and binarization generator's), the progress through the current epoch, the config and the metrics so
far, so ``train_run(..., resume=True)`` continues exactly where the run stopped: a run trained in
pieces has the same parameters and metrics as one trained straight through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, NamedTuple

import pyro
import torch

from pyrovae.atomic import atomic_write
from pyrovae.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyrovae.config import Config
from pyrovae.data import batches, binarize, load_dataset, to_unit
from pyrovae.evaluate import evaluate, seeded_noise
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.model import build_vae
from pyrovae.objectives import build_objective
from pyrovae.train import EpochState, NonFiniteLossError, make_optimizer, resolve_device, train_epoch

__all__ = ["RunFolderError", "Interrupted", "Prepared", "train_run", "provenance", "write_json", "write_figures",
           "prepare_data"]


class RunFolderError(FileExistsError):
    """The output folder already holds another run."""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


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


class Prepared(NamedTuple):
    """A dataset made ready for a model: what the training loop and the evaluation read."""

    train: torch.Tensor  # (N, C, H, W) on the device: uint8 grey levels, or floats when prepared once
    per_batch: Callable | None  # turns a training batch into model inputs (binarize, to_unit) or None
    test: torch.Tensor  # (M, C, H, W) float model inputs on the device, fixed for every run
    test_labels: torch.Tensor  # (M,) on the CPU
    kind: str  # what the likelihood models: binary, unit or 8bit


def prepare_data(config: Config, device: torch.device, download: bool = True) -> Prepared:
    """Load the configured dataset and turn it into what the configured likelihood models.

    Binary likelihoods: training images binarized dynamically (per batch) or statically (once, from
    the run's seed); the test set binarized once from ``data.test_binarization_seed``, on the CPU, so
    it is the same for every run and device. Other likelihoods: grey levels / 255.
    """
    d, t = config.data, config.train
    kind = LIKELIHOODS[config.model.likelihood].data_kind
    train = load_dataset(d.dataset, d.data_dir, train=True, download=download, device=device,
                         image_size=d.image_size)
    test = load_dataset(d.dataset, d.data_dir, train=False, download=download, device="cpu",
                        image_size=d.image_size)
    train_images = train.images[: t.train_subset] if t.train_subset else train.images
    test_images, test_labels = test.images, test.labels
    if t.test_subset:
        test_images, test_labels = test_images[: t.test_subset], test_labels[: t.test_subset]
    if kind != "binary":
        return Prepared(train_images, to_unit, to_unit(test_images).to(device), test_labels, kind)
    test_inputs = binarize(test_images, torch.Generator().manual_seed(d.test_binarization_seed)).to(device)
    if d.binarization == "static":
        train_images = binarize(train_images.cpu(), torch.Generator().manual_seed(t.seed)).to(device)
        return Prepared(train_images, None, test_inputs, test_labels, kind)
    return Prepared(train_images, binarize, test_inputs, test_labels, kind)


def learning_rate(t, epochs_done: int) -> float:
    """The learning rate for the epoch after ``epochs_done`` epochs: ``lr * lr_decay^(milestones passed)``."""
    return t.lr * t.lr_decay ** sum(epochs_done >= m for m in t.lr_milestones)


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


@contextlib.contextmanager
def _stop_on_signals():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train_run(config: Config | None, out_dir, *, quiet: bool = False, overwrite: bool = False,
              download: bool = True, resume: bool = False, log=print) -> dict:
    """Train the configured VAE and write every output into ``out_dir``; returns the metrics.

    With ``resume=True`` the run in ``out_dir`` continues from its checkpoint; ``config`` (may be
    None) then only sets a new budget, ``train.epochs`` counting all epochs.
    """
    out = Path(out_dir)
    state = None
    if resume:
        state = load_checkpoint(out / "checkpoint.pt")
        config = _resumable_config(out, config, state)
    else:
        _check_out_dir(out, overwrite)
    t = config.train
    device = resolve_device(t.device)
    data = prepare_data(config, device, download)
    train_images, test_inputs = data.train, data.test
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        config.save(out / "config.json")

    pyro.set_rng_seed(t.seed)  # initialization and reparameterization noise
    data_rng = torch.Generator(device=device).manual_seed(t.seed + 1)  # data order and binarization
    vae = build_vae(config.model, tuple(train_images.shape[1:])).to(device)
    loss_fn = build_objective(t.objective, vae, t.particles)
    optimizer = make_optimizer(vae.parameters(), t.lr, device)
    vae.check_data(next(batches(train_images[: t.batch_size], t.batch_size, torch.Generator(device=device),
                                data.per_batch)))  # once: the loop only cuts batches from this tensor

    metrics = {"config": config.to_dict(), "seed": t.seed, **provenance(device),
               "units": "nats per image (bits/dim for 8-bit likelihoods)",
               "data": {"kind": data.kind, **({"train_binarization": config.data.binarization,
                        "test_binarization": "once, seed data.test_binarization_seed"} if data.kind == "binary"
                        else {"inputs": "grey levels / 255"})},
               "epochs": []}
    epoch, global_step, partial = 0, 0, EpochState()
    epoch_start_rng = data_rng.get_state()
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        metrics["epochs"] = state["metrics"]
        epoch, global_step = state["epoch"], state["global_step"]
        partial = EpochState(**state["partial_epoch"])
        epoch_start_rng = state["rng"]["data_epoch_start"]

    def checkpoint():
        save_checkpoint(out / "checkpoint.pt", vae=vae, optimizer=optimizer, config=config, epoch=epoch, extra={
            "global_step": global_step, "partial_epoch": dataclasses.asdict(partial), "metrics": metrics["epochs"],
            "rng": {"torch": torch.get_rng_state(), "data_epoch_start": epoch_start_rng,
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}})

    num_batches = -(-train_images.shape[0] // t.batch_size)
    budget_left = lambda: t.max_steps is None or global_step < t.max_steps  # noqa: E731
    with _stop_on_signals() as signals:
        while epoch < t.epochs and budget_left():
            for group in optimizer.param_groups:  # a function of the epoch, so resuming sets it again exactly
                group["lr"] = learning_rate(t, epoch)
            data_rng.set_state(epoch_start_rng)
            epoch_batches = batches(train_images, t.batch_size, data_rng, data.per_batch)
            for _ in range(partial.step):  # resuming part-way: replay the same draws up to where it stopped
                next(epoch_batches)
            if state is not None:  # resuming: the noise stream goes on from where it stopped
                torch.set_rng_state(state["rng"]["torch"])
                if device.type == "cuda" and state["rng"]["cuda"] is not None:
                    torch.cuda.set_rng_state(state["rng"]["cuda"], device)
                state = None
            steps_before = global_step - partial.step

            def pause() -> bool:
                step = steps_before + partial.step
                return bool(signals) or (t.max_steps is not None and step >= t.max_steps) or (
                    t.checkpoint_every_steps is not None and step % t.checkpoint_every_steps == 0)

            def set_kl_weight(step_in_epoch: int) -> None:  # a function of the global step: resumes exactly
                step = steps_before + step_in_epoch
                warm = min(1.0, (step + 1) / t.kl_warmup_steps) if t.kl_warmup_steps else 1.0  # never 0
                vae.kl_weight = t.kl_weight * warm

            vae.train()
            while True:
                try:
                    with vae.inputs_checked():
                        train_epoch(loss_fn, optimizer, epoch_batches, state=partial, num_batches=num_batches,
                                    progress=None if not quiet else False, should_stop=pause,
                                    description=f"epoch {epoch + 1}/{t.epochs}", grad_clip=t.grad_clip,
                                    before_step=set_kl_weight,
                                    where=f"epoch {epoch + 1}, ")
                except NonFiniteLossError as e:
                    raise NonFiniteLossError(f"{e}; training stopped. The last good checkpoint (epoch {epoch}) "
                                             f"is kept in {out / 'checkpoint.pt'}. Try a lower --lr, or set "
                                             "train.grad_clip") from None
                finally:
                    global_step = steps_before + partial.step
                if signals:
                    checkpoint()
                    raise Interrupted(signals[0], (
                        f"stopped by {signal.Signals(signals[0]).name} at epoch {epoch + 1}, step {partial.step} "
                        f"of the epoch; checkpoint written to {out / 'checkpoint.pt'}. Resume with: "
                        f"pyrovae train --resume {out} --epochs {t.epochs}"))
                if not partial.interrupted:
                    break  # the epoch is over
                partial.interrupted = False
                checkpoint()  # every train.checkpoint_every_steps steps, and where the step budget ends
                if not budget_left():
                    break
            if partial.step < num_batches:  # the step budget ended the run inside this epoch
                metrics["stopped_at_step"] = global_step
                write_json(out / "metrics.json", metrics)
                break

            epoch += 1
            epoch_start_rng = data_rng.get_state()
            vae.kl_weight = 1.0  # figures are always the plain ELBO
            vae.eval()
            test = evaluate(vae, test_inputs, seed=config.data.test_binarization_seed)
            row = {"epoch": epoch, "train_neg_elbo": partial.loss, "test_neg_elbo": test["neg_elbo"],
                   "test_reconstruction": test["reconstruction"], "test_kl": test["kl"],
                   **({"test_bits_per_dim": test["bits_per_dim"]} if "bits_per_dim" in test else {}),
                   "seconds": partial.seconds, "steps": global_step, "lr": learning_rate(t, epoch - 1)}
            metrics["epochs"].append(row)
            partial = EpochState()
            if not quiet:
                log(f"epoch {epoch:3d}  train -ELBO {row['train_neg_elbo']:8.2f}  test -ELBO "
                    f"{row['test_neg_elbo']:8.2f} nats/image  ({row['seconds']:.2f} s)")
            checkpoint()
            write_json(out / "metrics.json", metrics)

    write_figures(vae, out, metrics["epochs"], test_inputs, data.test_labels, seed=t.seed)
    return metrics


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
