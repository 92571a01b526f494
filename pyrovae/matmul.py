"""Which library multiplies the networks' matrices on the CPU: torch's default BLAS or oneDNN.

The linear layers' products are half of a CPU training step of the default model. How fast they
run depends on the processor: on an AMD EPYC with AVX-512, oneDNN's float32 product ran at about
twice the speed of the default BLAS (MKL); on one without AVX-512 the two were equal. So the choice
is made by measuring, ``train.matmul``:

- ``auto`` times a forward and backward pass of the run's own loss on its own first batch both
  ways, at start-up, and keeps oneDNN only where it is clearly faster (:func:`choose`). Runs too
  short to win the measurement back (as for ``train.compile``) keep the default BLAS;
- ``blas`` and ``onednn`` choose outright.

The choice is kept in the checkpoint, so a resumed run multiplies as it did, and written to
``metrics.json`` with the times that made it.

The oneDNN route is the operator ``pyrovae::onednn_linear`` (:func:`onednn_linear`) with a backward
of its own: torch's ``mkldnn._linear_pointwise`` records no gradient, so the two products of a
linear layer's gradient go through it too. Being an operator with a shape-only implementation, it is
a single node in a traced graph (``train.compile``), which inductor calls as it stands.
:class:`OneDNNLinear` sends ``F.linear`` (and so ``nn.Linear``) there while active, and
:class:`OneDNNLoss` runs a loss module under it; the networks stay stock torch modules.
"""

import statistics
import time
from typing import Optional

import pyro
import torch
from torch.overrides import TorchFunctionMode

from pyrovae.compiled import AUTO_COMPILE_MIN_STEPS  # a run long enough to compile is long enough to measure

__all__ = ["BACKENDS", "onednn_linear", "OneDNNLinear", "OneDNNLoss", "measure", "choose", "Choice"]

#: The values of ``train.matmul``.
BACKENDS = ("auto", "blas", "onednn")

#: ``auto`` keeps oneDNN only where its pass is at least this much faster than the default BLAS's:
#: a margin for timing noise, so that no processor gets a route that is not faster.
MARGIN = 0.95


def onednn_available() -> bool:
    """Whether this torch can run a float32 linear layer through oneDNN."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def float32_on_cpu(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


@torch.library.custom_op("pyrovae::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN: ``F.linear`` for float32 CPU tensors, x of any leading
    shape; the same product, rounded differently in the last bits. Differentiable."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_shape(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _keep_for_backward(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _onednn_linear_backward(ctx, grad):
    """The gradients of y = x W^T + b: dy W for x, dy^T x for W (over all leading dims) and the sum
    of dy for b, the products through oneDNN as well; none that is not needed is computed."""
    x, weight = ctx.saved_tensors
    grad = grad.contiguous()
    rows = grad.reshape(-1, grad.shape[-1])
    # oneDNN takes the transposed operands as strided views: copying them first cost as much as a product
    grad_x = onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None
    grad_w = onednn_linear(rows.t(), x.reshape(-1, x.shape[-1]).t()) if ctx.needs_input_grad[1] else None
    grad_b = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_keep_for_backward)


def linear_or_none(x, weight, bias=None, *more, **options):
    """``F.linear(x, weight, bias)`` through oneDNN, or None where that route does not apply: arguments
    beyond those three, tensors that are not float32 on the CPU, or a torch without oneDNN."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if more or options or not (onednn_available() and float32_on_cpu(*tensors) and x.dim() >= 2):
        return None
    return onednn_linear(x, weight, bias)


class OneDNNLinear(TorchFunctionMode):
    """While active, ``F.linear`` (which ``nn.Linear`` calls) runs through :func:`onednn_linear`
    wherever :func:`linear_or_none` takes the call; every other call runs as it would without it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._C._nn.linear:
            out = linear_or_none(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


class OneDNNLoss(torch.nn.Module):
    """A loss module (``loss(x, kl_weight=beta)``) whose linear layers multiply through oneDNN.

    Its parameters are the wrapped module's, under ``module.`` (as DDP names them)."""

    def __init__(self, loss_fn: torch.nn.Module):
        super().__init__()
        self.module = loss_fn

    def forward(self, x: torch.Tensor, kl_weight=1.0) -> torch.Tensor:
        with OneDNNLinear():
            return self.module(x, kl_weight=kl_weight)


def measure(loss_fn: torch.nn.Module, x: torch.Tensor, rounds: int = 3, passes: int = 2) -> dict[str, float]:
    """Seconds of one forward and backward pass of ``loss_fn`` on the batch ``x`` through each
    backend: the median of ``rounds`` interleaved rounds of ``passes`` passes, after one untimed
    pass each (oneDNN prepares its kernels at the first call).

    The run is left as it was: the passes draw their noise from forked random streams, and compute
    gradients without storing them; buffers a forward pass updates are put back.
    """
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    buffers = [b.detach().clone() for b in loss_fn.buffers()]
    routes = {"blas": loss_fn, "onednn": OneDNNLoss(loss_fn)}
    seconds: dict[str, list[float]] = {name: [] for name in routes}

    def one_pass(route):
        torch.autograd.grad(route(x), params, allow_unused=True)

    with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
        for route in routes.values():
            one_pass(route)
        for _ in range(rounds):
            for name, route in routes.items():
                began = time.perf_counter()
                for _ in range(passes):
                    one_pass(route)
                seconds[name].append((time.perf_counter() - began) / passes)
    with torch.no_grad():
        for b, saved in zip(loss_fn.buffers(), buffers):
            b.copy_(saved)
    return {name: statistics.median(times) for name, times in seconds.items()}


class Choice(dict):
    """The backend a run multiplies with (``choice["backend"]``: blas or onednn), why
    (``choice["by"]``) and, where it was measured, the seconds a pass took each way."""

    @property
    def backend(self) -> str:
        return self["backend"]

    def wrap(self, loss_fn: torch.nn.Module) -> torch.nn.Module:
        """``loss_fn`` as the run trains through it with this backend."""
        return OneDNNLoss(loss_fn) if self.backend == "onednn" else loss_fn


def choose(setting: str, loss_fn: torch.nn.Module, device: torch.device, batch, *, steps: int,
           resumed: str | None = None, min_steps: int = AUTO_COMPILE_MIN_STEPS, log=print) -> Choice:
    """The backend for a run of ``steps`` steps on ``device`` that trains ``loss_fn``, by
    ``train.matmul`` (``setting``); ``batch()`` gives a batch to time it on (called only to measure),
    and ``resumed`` is the backend the run's checkpoint trained with (None: a new run)."""
    linear = any(isinstance(m, torch.nn.Linear) for m in loss_fn.modules())
    if device.type != "cpu":
        if setting == "onednn":
            log(f"note: train.matmul = onednn applies on the CPU only; this run is on {device.type}")
        return Choice(backend="blas", by=f"the default on {device.type}")
    if setting != "blas" and not onednn_available():
        if setting == "onednn":
            log("note: train.matmul = onednn: this torch has no oneDNN; the default BLAS multiplies")
        return Choice(backend="blas", by="no oneDNN in this torch")
    if setting == "blas" or not linear:
        return Choice(backend="blas", by="train.matmul" if setting == "blas" else "no linear layers")
    if resumed is not None:
        return Choice(backend=resumed, by="the checkpoint")
    if setting == "onednn":
        return Choice(backend="onednn", by="train.matmul")
    if steps < min_steps:
        return Choice(backend="blas", by=f"a run of under {min_steps} steps keeps the default")
    seconds = measure(loss_fn, batch())
    backend = "onednn" if seconds["onednn"] < MARGIN * seconds["blas"] else "blas"
    log(f"matrix products: {backend} (a forward and backward pass took {seconds['blas'] * 1e3:.1f} ms through "
        f"the default BLAS, {seconds['onednn'] * 1e3:.1f} ms through oneDNN)")
    return Choice(backend=backend, by="measured", seconds=seconds)
