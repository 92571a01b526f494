"""Faster steps: a compiled loss module, and a step replayed on static buffers (a CUDA graph on CUDA).

``train.compile`` is a switch, off by default; ``train.cuda_graph`` is ``auto`` by default (on
wherever the step can be captured):

- ``train.compile = true`` runs the loss module through ``torch.compile``. It pays a compilation
  (tens of seconds on a CPU) and wins where the loss is plain tensor code: the hand-coded
  objectives. Dynamo does not capture Pyro's effect handlers in one graph (its ``Message`` is a
  TypedDict with optional keys, and every parameter site has its own name), so a Pyro objective
  breaks into many small graphs and recompiles; it is left in eager there. If compilation fails,
  the step falls back to eager with one line saying why.
- ``train.cuda_graph`` (CUDA only; ``auto`` or ``true``) records one whole step (Pyro's traces, the
  loss, the backward pass, the non-finite guard and the fused Adam update) as a CUDA graph on static
  input buffers, once; each later step copies its batch in and replays the kernels, so Pyro's Python
  runs only at capture. Batches of another shape (the last of an epoch) take the eager step. A step
  that reads a value back to the host (Pyro's IAF inverse does) cannot be captured: the first
  warm-up step runs with CUDA's synchronization check set to raise, and such a step is left eager,
  with one line saying why (:class:`CaptureUnsupported`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pyro
import torch

from pyrovae.engine import StepResult, train_step

__all__ = ["compile_loss", "StaticStep", "CaptureUnsupported"]


class CaptureUnsupported(RuntimeError):
    """The step reads a value back to the host, which a CUDA graph cannot hold; it stays eager."""


class _FallBack(torch.nn.Module):
    """A compiled loss module that turns itself back into the eager one the first time compiling fails."""

    def __init__(self, loss_fn: torch.nn.Module, log):
        super().__init__()
        self.module, self.log = loss_fn, log  # named like DDP's wrapped module: parameter names stay readable
        object.__setattr__(self, "compiled", torch.compile(loss_fn, dynamic=False))  # the same parameters
        self.failed = False

    def forward(self, x, kl_weight=1.0):
        if not self.failed:
            try:
                return self.compiled(x, kl_weight=kl_weight)
            except Exception as e:  # no C++ toolchain, an unsupported operation, ...
                self.failed = True
                self.log(f"note: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                         "training in eager mode")
        return self.module(x, kl_weight=kl_weight)


def compile_loss(loss_fn: torch.nn.Module, log=print) -> torch.nn.Module:
    """``loss_fn`` compiled with ``torch.compile``, falling back to eager (one line) if that fails.
    The parameters are the loss module's own, so optimizers and checkpoints see no difference.

    The compiled code draws its noise from torch's own generators (inductor's ``fallback_random``,
    set here for the process), so the draws, and a resumed run, are those of the eager step.
    """
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    return _FallBack(loss_fn, log)


class StaticStep:
    """One training step on static buffers, replayable: ``step(x, kl_weight)`` like :func:`train_step`.

    On CUDA (``capture=None`` or True) the step is captured once as a CUDA graph, after warm-up steps
    on a side stream whose effects (parameters, optimizer state, random streams) are undone, so the
    run is the eager run. Each call copies ``x`` into the static input and replays the graph; the
    returned :class:`StepResult` holds static tensors, overwritten by the next call. With
    ``capture=False`` the same step runs eagerly on the same static buffers (on any device).
    """

    def __init__(self, loss_fn, optimizer: torch.optim.Optimizer, example: torch.Tensor, *,
                 grad_clip: float | None = None, capture: bool | None = None, warmup: int = 3):
        self.x = example.detach().clone()
        self.shape = tuple(example.shape)
        self.kl_weight = torch.ones((), device=example.device)  # a tensor, so a new value needs no new graph
        self._step = lambda: train_step(loss_fn, optimizer, self.x, kl_weight=self.kl_weight, grad_clip=grad_clip)
        self.graph = None
        if capture if capture is not None else example.device.type == "cuda":
            self._capture(loss_fn, optimizer, warmup)

    def _capture(self, loss_fn, optimizer, warmup: int) -> None:
        # Pyro's validation reads values back to the host (the data check, the support checks), which a
        # graph cannot hold: warm-up and capture run without it, as fit runs every step.
        with pyro.validation_enabled(False):
            self._warm_up_and_capture(loss_fn, optimizer, warmup)

    def _warm_up_and_capture(self, loss_fn, optimizer, warmup: int) -> None:
        device = self.x.device
        for group in optimizer.param_groups:  # the update's step count and learning rate stay on the device
            group["capturable"] = True
        params = [p.detach().clone() for p in loss_fn.parameters()]
        state = copy.deepcopy(optimizer.state_dict())
        rng = torch.cuda.get_rng_state(device), torch.get_rng_state()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):  # CUDA graphs need the allocator and the kernels warmed up first
                for i in range(max(warmup, 2)):  # the second step is checked: the first may set things up
                    with _host_reads_raise() if i == 1 else contextlib.nullcontext():
                        self._step()
        except RuntimeError as e:
            if "synchroniz" not in str(e):
                raise
            reason = str(e).splitlines()[0][:160]
            raise CaptureUnsupported(f"the step reads a value back to the host ({reason})") from None
        finally:
            torch.cuda.current_stream(device).wait_stream(side)
            with torch.no_grad():  # undo the warm-up: the run goes on as if it had not happened
                for p, saved in zip(loss_fn.parameters(), params):
                    p.copy_(saved)
            optimizer.load_state_dict(state)
            torch.cuda.set_rng_state(rng[0], device)
            torch.set_rng_state(rng[1])
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.result = self._step()

    def __call__(self, x: torch.Tensor, kl_weight: float = 1.0) -> StepResult:
        """One step on ``x``: copied into the static input, then the graph replayed (or the step run)."""
        self.x.copy_(x)
        self.kl_weight.fill_(kl_weight)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.result


@contextlib.contextmanager
def _host_reads_raise():
    """CUDA's synchronization check set to raise for the block (and restored after): a host read in
    the block is a ``RuntimeError`` instead of a stall. torch calls the check a prototype and warns."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.cuda.set_sync_debug_mode(previous)
