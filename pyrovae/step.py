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

__all__ = ["StepResult", "train_step"]


@dataclass
class StepResult:
    """What one step leaves on the device: nothing here has been read by the host."""

    loss: torch.Tensor  # () the batch's -ELBO sum, detached
    loss_finite: torch.Tensor  # () bool
    grads_finite: torch.Tensor  # (parameters,) bool, in optimizer order; True where there is no gradient


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def train_step(loss_fn, optimizer: torch.optim.Optimizer, x: torch.Tensor, *, kl_weight: float = 1.0,
               grad_clip: float | None = None) -> StepResult:
    """One optimizer step on the batch ``x``; no update at all where the loss or a gradient is not finite.

    With a fused optimizer (what :func:`make_optimizer` builds) the step never waits on the device:
    the finiteness flag goes to the kernel as ``found_inf``. Any other optimizer is guarded by a host
    check, one read per step.
    """
    loss = loss_fn(x, kl_weight=kl_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    everything = _parameters(optimizer)
    params = [p for p in everything if p.grad is not None]
    norms = torch._foreach_norm([p.grad for p in params])  # one kernel for all parameters
    loss_finite = torch.isfinite(loss.detach())
    finite = iter(torch.isfinite(torch.stack(norms)).unbind() if norms else ())
    grads_finite = torch.stack([next(finite) if p.grad is not None else loss_finite.new_ones(()) for p in everything])
    skip = ~(loss_finite & grads_finite.all())
    if grad_clip is not None and norms:
        total = torch.linalg.vector_norm(torch.stack(norms))
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, total, foreach=True)
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()  # read by the fused kernel on the device
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skip:  # a host read: the price of an optimizer without an on-device guard
        optimizer.step()
    return StepResult(loss.detach(), loss_finite, grads_finite)
