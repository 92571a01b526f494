"""One training loop for any loss module (``loss(x)`` -> negative ELBO summed over the batch)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

__all__ = ["resolve_device", "make_optimizer", "train_epoch", "EpochState",
           "NonFiniteLossError", "DeviceUnavailableError"]


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist on this machine."""


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("device 'cuda' was asked for, but no CUDA GPU is available here; "
                                     "use --device cpu or auto")
    return torch.device(name)


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam; the fused kernel where torch has one for the device (CPU and CUDA)."""
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))


@dataclass
class EpochState:
    """Progress through one epoch; enough to resume it part-way."""

    step: int = 0  # optimizer steps taken in this epoch
    loss_sum: float = 0.0  # summed -ELBO of the images seen in this epoch
    images: int = 0  # images seen in this epoch
    seconds: float = 0.0  # training time spent in this epoch
    interrupted: bool = False  # stopped before the end of the epoch

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.images, 1)


def train_epoch(
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[torch.Tensor],
    *,
    state: EpochState | None = None,
    num_batches: int | None = None,
    progress: bool | None = None,
    description: str = "",
    grad_clip: float | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    before_step: Callable[[int], None] | None = None,
    where: str = "",
) -> EpochState:
    """Train on the batches ``batches`` still has to give, adding to ``state`` (a new one by default).

    Each step checks that the loss and the gradient norm are finite; a non-finite value raises
    :class:`NonFiniteLossError` before the optimizer touches the parameters. ``should_stop()`` is
    asked after every step; when it says yes the epoch ends early with ``interrupted`` set.
    ``before_step(step_in_epoch)`` runs before each step.
    ``progress=None`` shows a tqdm bar only when stderr is a terminal.
    """
    state = state if state is not None else EpochState()
    if progress is None:
        progress = sys.stderr.isatty()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # a bar updated by hand: tqdm wrapping `batches` would close a generator we may go on with later
    bar = tqdm(total=num_batches, initial=state.step, desc=description, leave=False, disable=not progress,
               unit="batch")
    start = time.perf_counter()
    try:
        for x in batches:
            if before_step is not None:
                before_step(state.step)  # e.g. set this step's KL weight
            loss = loss_fn(x)
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(f"the loss is {value} at {where}step {state.step + 1} of the epoch")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if not torch.isfinite(norm):
                bad = [n for n, p in _named(loss_fn) if p.grad is not None and not torch.isfinite(p.grad).all()]
                raise NonFiniteLossError(f"the gradient of {', '.join(bad[:5]) or 'the parameters'} is not "
                                         f"finite at {where}step {state.step + 1} of the epoch")
            if grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm, foreach=True)
            optimizer.step()
            state.step += 1
            state.loss_sum += value
            state.images += x.shape[0]
            bar.update()
            if should_stop():
                state.interrupted = True
                break
    finally:
        state.seconds += time.perf_counter() - start
        bar.close()
    return state


def _named(module):
    return module.named_parameters() if hasattr(module, "named_parameters") else []
