"""Checkpoints: module state, optimizer state and config in one file, written atomically.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then renamed
over the old one, so a crash mid-write leaves the previous checkpoint intact. It is read with
``torch.load(weights_only=True)``: only tensors and plain containers, never arbitrary objects.
:class:`Checkpointer` writes a run's checkpoint from every process of the run: it gathers their
sums and noise generators, rank 0 writes, all wait; ``resume`` hands each process its state.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from pyrovae.atomic import atomic_write
from pyrovae.config import Config, ConfigError
from pyrovae.distributed import World
from pyrovae.state import TrainState, summed

__all__ = ["CheckpointError", "Checkpointer", "restore_noise", "save_checkpoint", "load_checkpoint", "load_vae", "load"]

FORMAT = "pyrovae-checkpoint"
VERSION = 3  # 3: the data stream follows from the seed; 2 (still read): the state kept the data generator's
# state ("data_rng"); 1 (still read): the progress was spread over the top level


class CheckpointError(ValueError):
    """A file is not a usable pyrovae checkpoint."""


def save_checkpoint(path, *, vae, optimizer, config: Config, state: dict) -> None:
    """Write the module and optimizer states, the config and ``state`` (a ``TrainState.to_dict()``)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "image_shape": list(vae.image_shape),
        "model": vae.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "state": state,
    }
    buffer = io.BytesIO()  # serialized in memory first: a failed disk write is then a plain OSError
    torch.save(payload, buffer)
    atomic_write(path, buffer.getbuffer())


class Checkpointer:
    """A run's checkpoint file, written and read by every process of the run.

    :meth:`save` gathers the processes' noise generators and sums their epoch totals; rank 0 writes
    the file and all wait for it. :meth:`resume` hands each process the state it goes on from. With
    ``path`` None nothing is written (a loop that keeps no checkpoint).
    """

    def __init__(self, path: str | Path | None, world: World = World()):
        self.path, self.world = (Path(path) if path is not None else None), world

    def save(self, state: TrainState, *, vae, optimizer, config: Config, device: torch.device) -> None:
        if self.path is None:
            return
        world = self.world
        state.noise_rng = {"torch": torch.get_rng_state(),
                           "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        noise = world.gather(state.noise_rng)
        saved = summed(state, world)
        saved.rank_noise_rng = noise if world.size > 1 else None
        if world.main:
            save_checkpoint(self.path, vae=vae, optimizer=optimizer, config=config, state=saved.to_dict())
        world.barrier()  # no process goes on before the checkpoint is in place

    def resume(self, saved: dict, device: torch.device) -> TrainState:
        """The saved state (a checkpoint's ``state``) as this process goes on from it: rank 0 carries
        the epoch's sums (the checkpoint holds the totals of all processes), and each process its own
        noise generators when the number of processes is the one that saved them."""
        state, world = TrainState.from_dict(saved, device), self.world
        if not world.main:
            state.loss_sum, state.images, state.skipped = torch.zeros_like(state.loss_sum), 0, None
        if state.rank_noise_rng is not None and len(state.rank_noise_rng) == world.size:
            state.noise_rng = state.rank_noise_rng[world.rank]
        elif not world.main:
            state.noise_rng = None  # a different number of processes: a fresh stream (not bit-exact)
        return state

    def last_good(self) -> str:
        """Which checkpoint is still good, in words (after a failed step)."""
        if self.path is None or not self.path.is_file():
            return "No checkpoint had been written yet"
        saved = load_checkpoint(self.path)["state"]
        return f"The last good checkpoint (epoch {saved['epoch']}, step {saved['step']}) is kept in {self.path}"


def restore_noise(state: TrainState, device: torch.device) -> None:
    """Resuming: the reparameterization noise goes on from where the saved state left it."""
    if state.noise_rng is not None:
        torch.set_rng_state(state.noise_rng["torch"])
        if device.type == "cuda" and state.noise_rng["cuda"] is not None:
            torch.cuda.set_rng_state(state.noise_rng["cuda"], device)


def load_checkpoint(path, map_location="cpu") -> dict[str, Any]:
    """Read and check a checkpoint file; raise :class:`CheckpointError` saying what is wrong."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give the checkpoint.pt file of a run (or its folder)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} could not be read as a pyrovae checkpoint (truncated, corrupt or not a checkpoint): "
            f"{type(e).__name__}: {str(e).splitlines()[0].split('. ')[0] if str(e) else ''}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pyrovae checkpoint (no '{FORMAT}' marker)")
    if state.get("version") == 1:
        return _from_version_2(_from_version_1(state))
    if state.get("version") == 2:
        return _from_version_2(state)
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} is checkpoint version {state.get('version')}; this pyrovae reads versions 1 "
                              f"to {VERSION}. Load it with the pyrovae release that wrote it, or train it afresh")
    return state


def _from_version_2(old: dict) -> dict:
    """A version-2 checkpoint as version 3. Its data stream was a generator whose state it kept; now
    the stream follows from (seed, epoch, step), so the run goes on with the new stream of its seed:
    from the next epoch when it was saved at the end of one, and, when it was saved inside an epoch,
    from the start of that epoch again (its partial sums dropped; the steps taken stay counted)."""
    state = {k: v for k, v in old["state"].items() if k != "data_rng"}
    state["seed"] = old["config"].get("train", {}).get("seed", 0)
    if state.get("epoch_step"):
        state.update(epoch_step=0, images=0, seconds=0.0, loss_sum=torch.zeros((), dtype=torch.float64))
    return {**old, "version": VERSION, "state": state}


def _from_version_1(old: dict) -> dict:
    """A version-1 checkpoint in the version-2 layout: the same run, resumable as it was."""
    partial = old.get("partial_epoch", {})
    rng = old.get("rng", {})
    new = {k: old[k] for k in ("format", "image_shape", "optimizer")}
    new["version"] = 2
    model_config = dict(old["config"]["model"])  # the q(z|x) family was called the guide
    for key, renamed in (("guide", "posterior"), ("guide_options", "posterior_options")):
        if key in model_config:
            model_config[renamed] = model_config.pop(key)
    new["config"] = {**old["config"], "model": model_config}
    new["model"] = {("posterior." + k[len("guide_net."):] if k.startswith("guide_net.") else k): v
                    for k, v in old["model"].items()}
    new["state"] = {
        "data_rng": rng.get("data_epoch_start"), "epoch": old["epoch"],
        "noise_rng": {"torch": rng["torch"], "cuda": rng.get("cuda")} if "torch" in rng else None,
        "step": old.get("global_step", 0), "epoch_step": partial.get("step", 0),
        "loss_sum": torch.tensor(float(partial.get("loss_sum", 0.0)), dtype=torch.float64),
        "images": partial.get("images", 0), "seconds": partial.get("seconds", 0.0), "history": old.get("metrics", []),
    }
    return new


def load_vae(path, map_location="cpu"):
    """(vae, config, state) from a checkpoint; the VAE is rebuilt from the saved config."""
    return vae_from_checkpoint(load_checkpoint(path, map_location), path, map_location)


def vae_from_checkpoint(state: dict, path, map_location="cpu"):
    """(vae, config, state) from a checkpoint already read (``path`` names it in messages)."""
    from pyrovae.build import build_vae

    try:
        config = Config.from_dict(state["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} holds a config this pyrovae cannot use: {e}") from None
    try:
        vae = build_vae(config.model, tuple(state["image_shape"]))
    except ConfigError as e:  # a part or plugin the run names is not available here
        raise CheckpointError(f"{path} holds a model this installation cannot build: {e}") from None
    try:
        vae.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the saved weights do not fit the saved config: {str(e).splitlines()[0]}") from None
    return vae.to(map_location), config, state


def load(run, map_location="cpu"):
    """The trained VAE of a run folder (or its ``checkpoint.pt``), in eval mode, ready for Pyro.

    Its config is ``vae.config``. For example::

        vae = pyrovae.load("runs/mnist")
        images = pyro.infer.Predictive(vae.model, num_samples=1)(batch_size=16)["x"]
    """
    vae, config, _ = load_vae(run, map_location)
    vae.config = config
    return vae.eval()
