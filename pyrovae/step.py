"""One optimizer step that reads nothing back from the device.

``train_step`` takes a loss module (``loss(x, kl_weight=beta)`` -> the negative ELBO summed over the
batch) through one Adam step: the loss stays a device tensor, and the non-finite guard is a device
flag that the fused Adam kernel reads itself (``found_inf``, the mechanism ``torch.amp.GradScaler``
uses), skipping the update on the device when the loss or a gradient is NaN or infinite. The loop
(:mod:`pyrovae.engine`) and the faster steps (:mod:`pyrovae.compiled`) both take it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["StepResult", "train_step", "guard"]


@dataclass
class StepResult:
    """What one step leaves on the device: nothing here has been read by the host."""

    loss: torch.Tensor  # () the batch's -ELBO sum, detached
    loss_finite: torch.Tensor  # () bool
    grads_finite: torch.Tensor  # (parameters,) bool, in optimizer order; True where there is no gradient
    too_large: torch.Tensor  # () bool: the update skipped because the gradient norm passed ``skip_norm``


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def train_step(loss_fn, optimizer: torch.optim.Optimizer, x: torch.Tensor, *, kl_weight: float = 1.0,
               grad_clip: float | None = None, skip_norm: float | None = None) -> StepResult:
    """One optimizer step on the batch ``x``; no update at all where the loss or a gradient is not finite,
    nor where the gradient's norm exceeds ``skip_norm`` (VDVAE's guard, Child 2021: a rare huge gradient
    of a deep stack of latents is dropped rather than clipped). ``grad_clip`` clips what is left.

    With a fused optimizer (what :func:`make_optimizer` builds) the step never waits on the device:
    the finiteness flag goes to the kernel as ``found_inf``. Any other optimizer is guarded by a host
    check, one read per step.
    """
    loss = loss_fn(x, kl_weight=kl_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    everything = _parameters(optimizer)
    loss_finite, grads_finite, too_large, skip = guard(loss, [p.grad for p in everything], grad_clip, skip_norm)
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()  # read by the fused kernel on the device
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skip:  # a host read: the price of an optimizer without an on-device guard
        optimizer.step()
    return StepResult(loss.detach(), loss_finite, grads_finite, too_large)


def guard(loss: torch.Tensor, grads: list[torch.Tensor | None], grad_clip: float | None = None,
          skip_norm: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's flags, as device tensors: whether the loss is finite, whether each gradient is
    (True where there is none), whether the gradients' total norm passed ``skip_norm``, and whether
    to skip the update (any of these). Where ``grad_clip`` is set, ``grads`` are scaled in place to
    that total norm at most (``torch.nn.utils.clip_grad_norm_``'s rule). Pure tensor arithmetic, so
    a traced step (:mod:`pyrovae.compiled`) holds it in its graph."""
    present = [g for g in grads if g is not None]
    norms = torch._foreach_norm(present) if present else []  # one kernel for all parameters
    loss_finite = torch.isfinite(loss.detach())
    finite = iter(torch.isfinite(torch.stack(norms)).unbind() if norms else ())
    grads_finite = torch.stack([next(finite) if g is not None else loss_finite.new_ones(()) for g in grads])
    skip = ~(loss_finite & grads_finite.all())
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms and (grad_clip or skip_norm) else None
    too_large = total > skip_norm if skip_norm is not None and total is not None else torch.zeros_like(skip)
    if grad_clip is not None and total is not None:
        torch._foreach_mul_(present, torch.clamp(grad_clip / (total + 1e-6), max=1.0))
    return loss_finite, grads_finite, too_large, skip | too_large
