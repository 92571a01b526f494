"""Where a run stands: a plain record of progress, the epoch's running sums and the history.

:class:`TrainState` is what a checkpoint holds beside the module and optimizer states, so a run
trained in pieces has the same parameters and metrics as one trained straight through. It records
and nothing else: the data each step takes belong to :mod:`pyrovae.stream`, writing it with the
processes' sums and noise generators to :class:`pyrovae.checkpoint.Checkpointer`, and the loop to
:func:`pyrovae.engine.fit`. Under torchrun each process keeps its own sums; :func:`epoch_totals`
adds them up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from pyrovae.distributed import World
from pyrovae.step import StepResult

__all__ = ["TrainState", "epoch_totals", "summed"]


@dataclass
class TrainState:
    """Progress, sums and history of one run (on each process, its own sums)."""

    seed: int = 0  # the run's seed: the data stream is a function of (seed, epoch, step) (pyrovae.stream)
    noise_rng: dict | None = None  # torch's generators (CPU, and CUDA) when saved; None: not yet saved
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken in all
    epoch_step: int = 0  # optimizer steps taken in the current epoch
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))  # this epoch's -ELBO
    skipped: torch.Tensor | None = None  # this epoch's updates skipped for a gradient norm over train.skip_grad_norm
    images: int = 0  # images seen in the current epoch
    seconds: float = 0.0  # training time in the current epoch
    history: list = field(default_factory=list)  # one row of figures per finished epoch
    data: dict | None = None  # what the run trains on: pyrovae.data.fingerprint, checked on resume
    world_size: int = 1  # processes that trained the run (torchrun); loss_sum and images are their totals
    rank_noise_rng: list | None = None  # every process's noise generators, in rank order (several processes)
    matmul: str | None = None  # the linear layers' backend the run trains with (pyrovae.matmul); None: not recorded

    @classmethod
    def start(cls, seed: int, device: torch.device, data: dict | None = None, matmul: str | None = None) -> "TrainState":
        return cls(seed=seed, loss_sum=torch.zeros((), dtype=torch.float64, device=device), data=data, matmul=matmul)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, device: torch.device) -> "TrainState":
        skipped = d.get("skipped")  # absent from checkpoints written before train.skip_grad_norm
        return cls(**{**d, "loss_sum": d["loss_sum"].to(device),
                      "skipped": None if skipped is None else skipped.to(device)})

    def record(self, result: StepResult, images: int) -> None:
        """One step taken on ``images`` images (no host read: the sums stay on the device)."""
        self.step += 1
        self.epoch_step += 1
        self.loss_sum += result.loss.double()
        self.skipped = result.too_large.long() + (0 if self.skipped is None else self.skipped.to(result.loss.device))
        self.images += images

    def end_epoch(self, totals: tuple[float, int, int], test: dict, lr: float) -> dict:
        """Close the epoch with its ``totals`` over all processes (:func:`epoch_totals`) and its test
        figures; returns the history row it adds."""
        loss, images, skipped = totals
        self.epoch += 1
        row = {"epoch": self.epoch, "train_neg_elbo": loss / max(images, 1),
               "test_neg_elbo": test["neg_elbo"], "test_reconstruction": test["reconstruction"],
               "test_kl": test["kl"], **({"test_kl_layers": test["kl_layers"]} if "kl_layers" in test else {}),
               **({"test_bits_per_dim": test["bits_per_dim"]} if "bits_per_dim" in test else {}),
               "seconds": self.seconds, "steps": self.step, "lr": lr, **({"skipped_steps": skipped} if skipped else {})}
        self.history.append(row)
        self.epoch_step, self.images, self.seconds, self.skipped = 0, 0, 0.0, None
        self.loss_sum = torch.zeros_like(self.loss_sum)
        return row


def epoch_totals(state: TrainState, world: World = World()) -> tuple[float, int, int]:
    """The epoch's -ELBO sum, image count and skipped updates so far, over all processes (host reads)."""
    skipped = state.loss_sum.new_tensor(0.0) if state.skipped is None else state.skipped.to(state.loss_sum)
    both = torch.stack([state.loss_sum, state.loss_sum.new_tensor(float(state.images)), skipped / world.size])
    loss, images, skipped = world.sum_(both.clone()).tolist()  # every process skips the same steps
    return loss, int(images), round(skipped)


def summed(state: TrainState, world: World = World()) -> TrainState:
    """A copy holding the epoch's sums over all processes (what a checkpoint holds)."""
    loss, images, skipped = epoch_totals(state, world)
    return dataclasses.replace(state, loss_sum=torch.tensor(loss, dtype=torch.float64), images=images,
                               skipped=torch.tensor(skipped), world_size=world.size)
