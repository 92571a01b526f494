"""One training loop for any loss module (``loss(x)`` -> negative ELBO summed over the batch)."""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

__all__ = ["resolve_device", "make_optimizer", "train_epoch", "NonFiniteLossError", "DeviceUnavailableError"]


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist on this machine."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("device 'cuda' was asked for, but no CUDA GPU is available here; use --device cpu or auto")
    return torch.device(name)


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam; the fused kernel where torch has one for the device (CPU and CUDA)."""
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))


def train_epoch(
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[torch.Tensor],
    *,
    num_batches: int | None = None,
    progress: bool | None = None,
    description: str = "",
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; returns the mean loss per image and the seconds it took.

    ``progress=None`` shows a tqdm bar only when stderr is a terminal.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    total, images = torch.zeros(()), 0
    start = time.perf_counter()
    bar = tqdm(batches, total=num_batches, desc=description, leave=False, disable=not progress, unit="batch")
    for step, x in enumerate(bar):
        loss = loss_fn(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss = loss.detach()
        total = total.to(loss.device) + loss  # summed on the device: no sync per step
        images += x.shape[0]
        if on_step is not None:
            on_step(step, loss.item())
    seconds = time.perf_counter() - start
    mean = total.item() / max(images, 1)
    if mean != mean or mean in (float("inf"), float("-inf")):
        raise NonFiniteLossError(f"the training loss became non-finite ({mean}) during this epoch")
    return {"loss": mean, "seconds": seconds, "images": images}
