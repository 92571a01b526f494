"""Faster steps: a compiled loss module, and a step replayed on static buffers (a CUDA graph on CUDA).

Both are ``auto`` by default:

- ``train.compile`` traces the loss module below Python and compiles the trace
  (:class:`TracedLoss`): Pyro's handlers run once, while tracing, and inductor fuses the graph's
  elementwise work. A run in one process traces the whole step (:meth:`TracedLoss.step`): the
  loss, its gradients and the non-finite guard are one graph, and torch's fused Adam kernel is
  called on its output directly, so no autograd engine and no optimizer Python run per step.
  (Dynamo itself does not capture Pyro's effect handlers in one graph: its ``Message`` is a
  TypedDict with optional keys, and every parameter site has its own name; a trace made at the
  dispatcher level never sees them.) On the CPU inductor compiles with every ``log1p`` written
  through the vectorized logarithm (:func:`log1p_by_log`): its own ``log1p`` runs one value at a
  time, and softplus and the Bernoulli log-density spent most of their time there. ``auto``
  compiles on the CPU for runs of at least :data:`AUTO_COMPILE_MIN_STEPS` steps; ``true`` always.
  If tracing or compiling fails, the step falls back to eager with one line saying why.
- ``train.cuda_graph`` (CUDA only; ``auto`` or ``true``) records one whole step (Pyro's traces, the
  loss, the backward pass, the non-finite guard and the fused Adam update) as a CUDA graph on static
  input buffers, once; each later step copies its batch in and replays the kernels, so Pyro's Python
  runs only at capture. Batches of another shape (the last of an epoch) take the eager step. A step
  that reads a value back to the host (Pyro's IAF inverse under a VampPrior does) cannot be
  captured: the second warm-up step runs with CUDA's synchronization check set to raise, and such
  a step is left eager, with one line saying why (:class:`CaptureUnsupported`).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import threading
import time
import warnings

import pyro
import torch
from torch.optim.adam import adam

from pyrovae.step import StepResult, guard, train_step

__all__ = ["compile_loss", "faster_loss", "TracedLoss", "StaticStep", "CaptureUnsupported", "AUTO_COMPILE_MIN_STEPS",
           "compile_at_first_call", "inductor", "log1p_by_log", "probe_compiler"]


class CaptureUnsupported(RuntimeError):
    """The step reads a value back to the host, which a CUDA graph cannot hold; it stays eager."""


def whole_step_only(loss_fn) -> str | None:
    """Why the objective must not be traced alone (``whole_step_only``, as DReG declares it), or
    None: asked of each wrapper in turn, since DDP, :class:`TracedLoss` and the oneDNN wrapper each
    keep what they wrap as ``.module``."""
    while loss_fn is not None:
        reason = getattr(loss_fn, "whole_step_only", None)
        if reason:
            return reason
        loss_fn = getattr(loss_fn, "module", None)
    return None


class TracedLoss(torch.nn.Module):
    """The loss module traced once below Python, then compiled: Pyro's handlers run only in the trace.

    ``make_fx`` records the aten operations one call of the loss runs for the first batch shape it
    sees, with the module's parameters and buffers as the graph's inputs (so the graph follows their
    values); Pyro's effect handlers, the distributions' Python and the objective's bookkeeping all
    run once, while tracing, and never again. Inductor then compiles that graph
    (:func:`compile_at_first_call`), fusing its elementwise work around the matrix products, forward
    and backward. The compiled code draws its noise from torch's own generators (inductor's
    ``fallback_random``, set here for the process), in the eager order, so runs and resumes are
    those of the eager step to float rounding. Batches of another shape (the last of an epoch), or
    the module in the other train/eval mode, take the eager module. A loss that reads a value back
    to the host while tracing (stock ``Trace_ELBO``'s ``.item()`` calls) cannot be a graph: it, and
    any failure to trace or compile, falls back to eager with one line saying why.
    """

    def __init__(self, loss_fn: torch.nn.Module, log=print, compiler=None):
        super().__init__()
        self.module, self.log = loss_fn, log  # named like DDP's wrapped module: parameter names stay readable
        # the traced graph's compiler
        self.compiler = compiler or compile_at_first_call
        self.key, self.failed, self.seconds, self._first = None, False, None, False  # seconds: trace and compile
        object.__setattr__(self, "graph", None)
        self.whole: _WholeStep | None = None  # the whole step's graph (:meth:`step`), once traced
        self.whole_failed, self._said_alone = False, False
        self.alone = whole_step_only(loss_fn)  # why the loss alone must not be traced, or None
        self._weights: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, kl_weight=1.0) -> torch.Tensor:
        if self.alone:
            if not self._said_alone:
                self._said_alone = True
                self.log(f"note: train.compile: {self.alone}; the loss alone stays eager")
            return self.module(x, kl_weight=kl_weight)
        key = (tuple(x.shape), x.dtype, x.device, self.module.training)
        if not self.failed and self.key is None and self.whole is None:  # the whole step's batches need no loss graph
            self._trace(x, kl_weight, key)
        if not self.failed and key == self.key:
            try:
                return self._run(x, kl_weight)
            except Exception as e:  # compiling happens at the first call: no C++ compiler, ...
                self._give_up("compiling", e)
        return self.module(x, kl_weight=kl_weight)

    def _inputs(self) -> list[torch.Tensor]:
        return [*self.module.parameters(), *self.module.buffers()]

    def _weight(self, kl_weight, device) -> torch.Tensor:
        if isinstance(kl_weight, torch.Tensor):
            return kl_weight
        key = (float(kl_weight), device)
        if key not in self._weights:  # a tensor, so a new value needs no new graph
            if len(self._weights) > 16:  # a KL warm-up brings a new value every step
                self._weights.clear()
            self._weights[key] = torch.tensor(float(kl_weight), device=device)
        return self._weights[key]

    def _trace(self, x, kl_weight, key) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        began = time.perf_counter()
        module = self.module

        def loss(*inputs):
            return module(inputs[-2], kl_weight=inputs[-1])
        try:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
                    pyro.validation_enabled(False):  # the trace's own draws leave the run's streams alone
                traced = make_fx(loss)(*self._inputs(), x, self._weight(kl_weight, x.device))
        except Exception as e:
            self._give_up("tracing", e)
            return
        object.__setattr__(self, "graph", self.compiler(traced))
        self.key, self.seconds, self._first = key, time.perf_counter() - began, True

    def _run(self, x, kl_weight) -> torch.Tensor:
        began = time.perf_counter()
        loss = self.graph(*self._inputs(), x, self._weight(kl_weight, x.device))
        if self._first:  # the first call compiles
            self._first, self.seconds = False, self.seconds + time.perf_counter() - began
        return loss

    def step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor, kl_weight=1.0, *, grad_clip: float | None = None,
             skip_norm: float | None = None) -> StepResult:
        """One whole training step on ``x``, as :func:`pyrovae.step.train_step` takes it through this
        loss, from one graph traced at the first full step: the loss, its gradients and the
        non-finite guard, compiled together; then torch's fused Adam kernel on the graph's
        gradients, skipping the update on the device where the guard says so. The first step of a
        fresh optimizer is eager (Adam makes its state there), and so are batches of another shape.
        Where the whole step cannot be a graph (an optimizer other than a fused Adam, or a failed
        trace, with one line saying why) the step is :func:`train_step` through the compiled loss."""
        weight = self._weight(kl_weight, x.device)
        whole = self._whole_step(optimizer, x, weight, grad_clip, skip_norm)
        if whole is not None:
            began = time.perf_counter()
            try:
                result = whole(x, weight, optimizer)
            except Exception as e:  # inductor compiles at the first call
                self._no_whole("compiling the whole step", e)
            else:
                if whole.first:  # the compilation counts in the trace-and-compile time
                    whole.first, self.seconds = False, self.seconds + time.perf_counter() - began
                return result
        eager = self.whole is not None or (not optimizer.state and not self.whole_failed)
        return train_step(self.module if eager else self, optimizer, x, kl_weight=kl_weight, grad_clip=grad_clip,
                          skip_norm=skip_norm)

    def _whole_step(self, optimizer, x, weight, grad_clip, skip_norm) -> _WholeStep | None:
        """The whole step's graph for this batch, traced now if it is the first full step after
        Adam has made its state; None where this step is not taken by the graph."""
        if self.failed or self.whole_failed:
            return None
        if self.whole is None:
            why = _WholeStep.unsupported(optimizer)
            if why:
                self.whole_failed = True
                self.log(f"note: train.compile: {why}; training with the compiled loss")
                return None
            if not optimizer.state:
                return None
            began = time.perf_counter()
            try:
                self.whole = _WholeStep(self, optimizer, x, weight, grad_clip, skip_norm)
            except Exception as e:
                self._no_whole("tracing the whole step", e)
                return None
            self.seconds = (self.seconds or 0.0) + time.perf_counter() - began
        return self.whole if self.whole.fits(x, optimizer, grad_clip, skip_norm, self.module.training) else None

    def _no_whole(self, stage: str, error: Exception) -> None:
        self.whole, self.whole_failed = None, True
        self.log(f"note: train.compile: {stage} failed ({_why(error)}); training with the compiled loss")

    def _give_up(self, stage: str, error: Exception) -> None:
        self.failed = True
        self.log(f"note: train.compile: {stage} failed ({_why(error)}); training in eager mode")


def log1p_by_log(x: torch.Tensor) -> torch.Tensor:
    """log(1 + x) from the logarithm, for the CPU's compiled graphs.

    Inductor's CPU code evaluates ``log1p`` one value at a time (about 5 ns a value, 20 times its
    vectorized ``log``), and softplus and the Bernoulli log-density spend most of their time there.
    With u = fl(1 + x), log1p(x) = log(u) * x / (u - 1), the rounding of 1 + x cancelling out
    (Goldberg 1991, "What every computer scientist should know about floating-point arithmetic",
    Theorem 4): exact to a few ulps wherever x > -1. Where u rounds to 1, log1p(x) = x to float
    precision; u = inf gives inf. At x = -1 it gives -inf, below -1 and at NaN NaN, as ``log1p``.
    Tensors that are not floating-point are left to the stock operator (``NotImplemented``, which
    ``make_fx`` reads as "no decomposition").

    Meant for forward values: inside a compiled step autograd differentiates ``log1p`` itself, with
    its own formula. Differentiated directly, the expression gives 1/(1 + x) too, except at x = inf
    (1 instead of 0) and x = -1 (NaN instead of inf).
    """
    if not x.is_floating_point():
        return NotImplemented
    u = x + 1
    gap = u - 1
    ratio = x / torch.where(gap == 0, torch.ones_like(gap), gap)  # no 0/0 in the branch not taken
    return torch.where(gap == 0, x, torch.where(u == float("inf"), u, torch.log(u) * ratio))


def _cpu_decompositions() -> dict:
    """Inductor's decompositions for graphs on the CPU, with every ``log1p`` as :func:`log1p_by_log`.

    Softplus, the Bernoulli log-density (``binary_cross_entropy_with_logits``) and ``log_sigmoid``
    are written out in torch's own decompositions there, and the ``log1p`` inside them goes the
    vectorized way. Only forward values change form: the derivatives are the stock formulas, and the
    traced graph itself (what ``make_fx`` records) is untouched, bit for bit the eager step.
    """
    from torch._decomp import get_decompositions
    from torch._inductor.decomposition import select_decomp_table

    aten = torch.ops.aten
    table = dict(select_decomp_table())
    table.update(get_decompositions([aten.softplus, aten.binary_cross_entropy_with_logits, aten.log_sigmoid_forward]))
    table[aten.log1p.default] = log1p_by_log
    return table


#: The background search for the CPU's vector instructions (:func:`probe_compiler`), once started.
_PROBES: list[threading.Thread] = []


def probe_compiler() -> None:
    """Start, in the background, inductor's search for the vector instructions its CPU code can use.

    Before its first CPU kernel inductor compiles and runs a test program for each instruction set
    the processor lists (AVX-512, AVX2, ...): about 5 s on two cores with an empty compile cache,
    one program after another, nothing once the cache holds them. Here each instruction set is
    tested on its own thread, so the compilers run side by side. A run that is about to compile on
    the CPU starts it, so that the compiler works while the first steps run and the step is traced;
    :func:`inductor` waits for it, and so does the interpreter's exit (a test program half-written
    to the cache would stay there). Where torch has no such search, this does nothing."""
    if _PROBES:
        return
    try:  # imported here, on the calling thread: two threads importing the compiler at once may clash
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    except Exception:
        return

    def search():
        with contextlib.suppress(Exception):  # the compilation itself will search, and say what fails
            tests = [threading.Thread(target=bool, args=(isa,), daemon=True) for isa in _listed_isas()]
            for test in tests:  # each instruction set's test programs at once: g++ runs on every core
                test.start()
            for test in tests:
                test.join()
            valid_vec_isa_list()  # the answers are cached by now
    _PROBES.append(threading.Thread(target=search, name="inductor-vector-isa", daemon=True))
    _PROBES[0].start()
    atexit.register(_PROBES[0].join, 60)


class compile_at_first_call:
    """``traced`` as a callable that compiles it with :func:`inductor` for the inputs of its first call.

    A graph traced below Python needs no bytecode capture: handing it to inductor directly (as
    ``torch._inductor.compile`` does) skips Dynamo's trace of the graph module's ``forward`` at
    compile time and its guards at every call. The caller keeps each graph to one input shape."""

    def __init__(self, traced: torch.fx.GraphModule):
        self.traced, self.compiled = traced, None

    def __call__(self, *inputs):
        if self.compiled is None:
            self.compiled = inductor(self.traced, list(inputs))
        return self.compiled(*inputs)


def _listed_isas() -> list:
    """Inductor's candidate instruction sets that the processor lists, x86 only (elsewhere none): the
    ones :func:`valid_vec_isa_list` would test one after another. Testing one (``bool(isa)``) builds
    and loads its programs once; the answer is cached on the object."""
    import platform
    from torch._inductor import cpu_vec_isa

    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    listed = cpu_vec_isa.x86_isa_checker()
    return [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(flag in listed for flag in str(isa).split())]


def inductor(graph: torch.fx.GraphModule, example_inputs) -> object:
    """The compiler of the traced steps: inductor, with :func:`_cpu_decompositions`
    where every input lives on the CPU (on a GPU ``log1p`` is as fast as ``log``)."""
    from torch._inductor.compile_fx import compile_fx  # a second of imports, while the search may still run

    for probe in _PROBES:
        probe.join()

    if not all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor)):
        return compile_fx(graph, example_inputs)
    # AOTAutograd's cache keys a graph before decomposition and without the table, so it could hand
    # back a stock compilation of the same graph; inductor's own cache, keyed after it, still applies
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(graph, example_inputs, decompositions=_cpu_decompositions())


def _why(error: Exception) -> str:
    text = str(error).splitlines()[0][:160] if str(error) else ""
    return ("the loss reads a value back to the host (.item() or a branch on a tensor's value), which a "
            "graph cannot hold" if "_local_scalar_dense" in str(error) else f"{type(error).__name__}: {text}")


class _WholeStep:
    """The loss, its gradients and the non-finite guard of one step as one compiled graph, for one
    batch shape and one setting of ``grad_clip``/``skip_norm``; Adam's update is torch's fused kernel
    (``torch.optim.adam.adam(..., fused=True)``, what ``Adam(fused=True).step()`` calls) on the
    graph's gradients, with the guard's flag as its ``found_inf``. The optimizer keeps its state
    and its learning rate (read at every step, so a schedule needs no new graph)."""

    def __init__(self, traced: TracedLoss, optimizer, x, weight, grad_clip, skip_norm):
        from torch.fx.experimental.proxy_tensor import make_fx

        module, inputs = traced.module, traced._inputs()
        groups = [[p for p in group["params"] if p.requires_grad] for group in optimizer.param_groups]
        self.key = (tuple(x.shape), x.dtype, x.device, module.training, grad_clip, skip_norm, id(optimizer))
        self.inputs, self.groups, self.first = inputs, groups, True
        everything = [p for group in groups for p in group]

        def step(*values):
            loss = module(values[-2], kl_weight=values[-1])
            grads = torch.autograd.grad(loss, everything, allow_unused=True)
            grads = list(grads)  # clipped in place by the guard
            return (loss.detach(), *guard(loss, grads, grad_clip, skip_norm), *grads)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
                pyro.validation_enabled(False):  # the trace's own draws leave the run's streams alone
            graph = make_fx(step)(*inputs, x, weight)
        self.graph = traced.compiler(graph)

    @staticmethod
    def unsupported(optimizer) -> str | None:
        """Why the whole step cannot take this optimizer (None: it can)."""
        if type(optimizer) is not torch.optim.Adam or not optimizer.defaults.get("fused"):
            return f"the whole step is traced for a fused Adam, not {type(optimizer).__name__}"
        if any(group["amsgrad"] or group.get("decoupled_weight_decay") for group in optimizer.param_groups):
            return "the whole step is traced for Adam without amsgrad and coupled weight decay"
        return None

    def fits(self, x, optimizer, grad_clip, skip_norm, training: bool) -> bool:
        return self.key == (tuple(x.shape), x.dtype, x.device, training, grad_clip, skip_norm, id(optimizer))

    def __call__(self, x, weight, optimizer) -> StepResult:
        with torch.no_grad():
            loss, loss_finite, grads_finite, too_large, skip, *grads = self.graph(*self.inputs, x, weight)
            found_inf, i = skip.float(), 0
            for params, group in zip(self.groups, optimizer.param_groups):
                pairs = [(p, g) for p, g in zip(params, grads[i:i + len(params)]) if g is not None]
                i += len(params)
                for p, g in pairs:
                    p.grad = g  # as after train_step: the step's gradients stay on the parameters
                state = [optimizer.state[p] for p, _ in pairs]
                adam(
                    [p for p, _ in pairs], [g for _, g in pairs], [s["exp_avg"] for s in state],
                    [s["exp_avg_sq"] for s in state], [], [s["step"] for s in state], fused=True, found_inf=found_inf,
                    amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
        return StepResult(loss, loss_finite, grads_finite, too_large)


def compile_loss(loss_fn: torch.nn.Module, log=print) -> TracedLoss:
    """``loss_fn`` traced below Python and compiled (:class:`TracedLoss`), falling back to eager
    (one line) where that fails. The parameters are the loss module's own, so optimizers and
    checkpoints see no difference."""
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    return TracedLoss(loss_fn, log)


#: ``train.compile = auto`` compiles on the CPU for runs of at least this many steps: tracing and
#: compiling take seconds (about 10 on two cores for the default model), which a short run would not
#: win back. On CUDA, auto leaves it to the CUDA graph (``train.cuda_graph``).
AUTO_COMPILE_MIN_STEPS = 2000


def faster_loss(t, loss_fn: torch.nn.Module, device: torch.device, steps: int, log=print) -> torch.nn.Module:
    """The loss module a run of ``steps`` steps trains through, by ``train.compile`` (``t``): compiled
    (:func:`compile_loss`) where it is asked for (true, or auto on the CPU for a long enough run),
    else ``loss_fn`` itself."""
    if t.compile is True or (t.compile == "auto" and device.type == "cpu" and steps >= AUTO_COMPILE_MIN_STEPS):
        if device.type == "cpu":
            probe_compiler()  # inductor's search of the CPU, beside the first steps and the trace
        return compile_loss(loss_fn, log)
    return loss_fn


class StaticStep:
    """One training step on static buffers, replayable: ``step(x, kl_weight)`` like :func:`train_step`.

    On CUDA (``capture=None`` or True) the step is captured once as a CUDA graph, after warm-up steps
    on a side stream whose effects (parameters, optimizer state, random streams) are undone, so the
    run is the eager run. Each call copies ``x`` into the static input and replays the graph; the
    returned :class:`StepResult` holds static tensors, overwritten by the next call. With
    ``capture=False`` the same step runs eagerly on the same static buffers (on any device).
    """

    def __init__(self, loss_fn, optimizer: torch.optim.Optimizer, example: torch.Tensor, *,
                 grad_clip: float | None = None, skip_norm: float | None = None, capture: bool | None = None,
                 warmup: int = 3):
        self.x = example.detach().clone()
        self.shape = tuple(example.shape)
        self.kl_weight = torch.ones((), device=example.device)  # a tensor, so a new value needs no new graph
        self._step = lambda: train_step(loss_fn, optimizer, self.x, kl_weight=self.kl_weight, grad_clip=grad_clip,
                                        skip_norm=skip_norm)
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
