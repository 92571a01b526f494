"""The training engine: one optimizer step, and one loop over one checkpointable state.

``train_step`` (from :mod:`pyrovae.step`) takes a loss module (``loss(x, kl_weight=beta)`` -> the
negative ELBO summed over the batch: a Pyro objective or the hand-coded one) through one Adam step
without reading anything back from the device: the loss stays a device tensor, and the non-finite
guard is a device flag that the fused Adam kernel reads itself (``found_inf``, the mechanism
``torch.amp.GradScaler`` uses), skipping the update on the device when the loss or a gradient is
NaN or infinite.

``fit`` is the loop. It takes its batches from the data stream (:mod:`pyrovae.stream`), records
each step in a :class:`pyrovae.state.TrainState` (what a checkpoint holds beside the module and
optimizer states, so a run trained in pieces has the same parameters and metrics as one trained
straight through), and hands the state to a :class:`pyrovae.checkpoint.Checkpointer` to write. The
loop reads the device's flags at most once per ``train.log_every_steps`` steps, before every
checkpoint and at the end of an epoch. It knows nothing of run folders (see :mod:`pyrovae.runs`): it
writes only the checkpoint file it is given.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Iterable

import pyro
import torch

from pyrovae.checkpoint import Checkpointer, restore_noise
from pyrovae.config import Config, TrainConfig
from pyrovae.data import Prepared, batches
from pyrovae.distributed import World
from pyrovae.evaluate import evaluate
from pyrovae.progress import progress
from pyrovae.state import TrainState, epoch_totals
from pyrovae.step import StepResult, _parameters, train_step
from pyrovae.stream import epoch_batches, steps_per_epoch

__all__ = ["train_step", "fit", "StepResult", "NonFiniteWatch", "make_optimizer", "resolve_device",
           "learning_rate", "kl_weight_at", "NonFiniteLossError", "DeviceUnavailableError", "Interrupted"]


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist on this machine."""


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient became NaN or infinite."""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("device 'cuda' was asked for, but no CUDA GPU is available here; "
                                     "use --device cpu or auto")
    return torch.device(name)


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam; the fused kernel where torch has one for the device (CPU and CUDA), which also skips a
    step on the device when told that a value was not finite."""
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))


def learning_rate(t: TrainConfig, epochs_done: int) -> float:
    """The learning rate for the epoch after ``epochs_done`` epochs: ``lr * lr_decay^(milestones passed)``."""
    return t.lr * t.lr_decay ** sum(epochs_done >= m for m in t.lr_milestones)


def kl_weight_at(t: TrainConfig, steps_done: int) -> float:
    """beta for the step after ``steps_done`` steps: ``kl_weight``, raised linearly over the warm-up (never 0)."""
    warm = min(1.0, (steps_done + 1) / t.kl_warmup_steps) if t.kl_warmup_steps else 1.0
    return t.kl_weight * warm


# --- a non-finite step, watched on the device -----------------------------------------------------


class NonFiniteWatch:
    """The first step whose loss or gradient was not finite, kept on the device until :meth:`check`."""

    def __init__(self, names: list[str], device: torch.device):
        self.names = names  # parameter names, in optimizer order
        self.steps = torch.zeros((), dtype=torch.int64, device=device)  # steps watched since the last check
        self.first = torch.full((), -1, dtype=torch.int64, device=device)  # their index (from 1) or -1
        self.loss = torch.zeros((), device=device)  # the loss of that step
        self.grads_finite = torch.ones(len(names), dtype=torch.bool, device=device)

    def add(self, result: StepResult) -> None:
        self.steps += 1
        new = (self.first < 0) & ~(result.loss_finite & result.grads_finite.all())
        self.first = torch.where(new, self.steps, self.first)
        self.loss = torch.where(new, result.loss.float(), self.loss)
        self.grads_finite = torch.where(new, result.grads_finite, self.grads_finite)

    def check(self, first_step: int, where: str) -> None:
        """Raise :class:`NonFiniteLossError` if a watched step was bad (one host read), then start afresh.

        ``first_step``: the step number within the epoch of the first step watched since the last check.
        """
        first = int(self.first)
        if first >= 0:
            step = first_step + first - 1
            loss = float(self.loss)
            if loss != loss or abs(loss) == float("inf"):
                raise NonFiniteLossError(f"the loss is {loss} at {where}step {step} of the epoch")
            bad = [n for n, ok in zip(self.names, self.grads_finite.tolist()) if not ok]
            raise NonFiniteLossError(f"the gradient of {', '.join(bad[:5]) or 'a parameter'} is not finite at "
                                     f"{where}step {step} of the epoch")
        self.steps.zero_()


def parameter_names(loss_fn, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter the optimizer holds, as the loss module calls it."""
    named = {id(p): n.replace("module.", "") for n, p in loss_fn.named_parameters()} \
        if hasattr(loss_fn, "named_parameters") else {}  # (wrappers, DDP's and the compiled one, add "module.")
    return [named.get(id(p), f"parameter {i}") for i, p in enumerate(_parameters(optimizer))]


@contextlib.contextmanager
def _stop_on_signals():
    """Turn SIGINT/SIGTERM into a list the loop looks at after each step (main thread only)."""
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


# --- the loop ------------------------------------------------------------------------------------
def fit(config: Config, vae, loss_fn, optimizer, data: Prepared, state: TrainState | None = None, *,
        checkpoint: Path | Checkpointer | None = None, quiet: bool = False, log=print, board=None,
        world: World = World()) -> TrainState:
    """Train ``vae`` through ``loss_fn`` to ``config.train``'s budget; checkpoint to ``checkpoint`` (a
    path, or a :class:`Checkpointer`); log to ``board`` (a :class:`pyrovae.board.Board`) when given.
    Under torchrun every process runs this loop on its part of each batch (``loss_fn`` wrapped by
    :func:`pyrovae.distributed.wrap`)."""
    t, device = config.train, data.train.device
    saver = checkpoint if isinstance(checkpoint, Checkpointer) else Checkpointer(checkpoint, world)
    if saver.world != world:
        raise ValueError(f"the checkpointer's world ({saver.world}) is not the loop's ({world}): give it the same one")
    state = state or TrainState.start(t.seed, device)
    restore_noise(state, device)
    quiet, log = quiet or not world.main, log if world.main else (lambda *_: None)
    watch = NonFiniteWatch(parameter_names(loss_fn, optimizer), device)
    per_epoch = steps_per_epoch(data.train.shape[0], t.batch_size, world)
    vae.check_data(next(batches(data.train[: t.batch_size], t.batch_size, torch.Generator(device), data.per_batch)))
    step = _Stepper(t, loss_fn, optimizer, -(-t.batch_size // world.size), device, log)
    stops = _Stops(t, world, device, per_epoch)
    with pyro.validation_enabled(False), _stop_on_signals() as signals, _progress(quiet) as bar:  # data checked
        while state.epoch < t.epochs and not _budget_spent(t, state) and not stops.now:
            _set_learning_rate(optimizer, learning_rate(t, state.epoch))
            vae.train()
            checked, start = state.epoch_step, time.perf_counter()
            for x in epoch_batches(data, t.batch_size, state.seed, state.epoch, state.epoch_step, world):
                result = step(x, kl_weight_at(t, state.step))
                watch.add(result)
                state.record(result, x.shape[0])
                bar.update()
                stop = stops.agree(state, signals) or _budget_spent(t, state)
                save = stop or (t.checkpoint_every_steps is not None and state.step % t.checkpoint_every_steps == 0)
                if save or state.step % t.log_every_steps == 0:
                    checked = _check(watch, checked, state, saver)
                    if board is not None and world.main:
                        board.step(state.step, result.loss, x.shape[0], learning_rate(t, state.epoch),
                                   kl_weight_at(t, state.step - 1))
                if save:
                    state.seconds, start = state.seconds + time.perf_counter() - start, time.perf_counter()
                    saver.save(state, vae=vae, optimizer=optimizer, config=config, device=device)
                if stop and state.epoch_step < per_epoch:  # at the last batch, let the epoch end
                    break
            if state.epoch_step < per_epoch:  # stopped inside the epoch (checkpoint written)
                loss, images, _ = epoch_totals(state, world)
                if not quiet:
                    log(f"stopped in epoch {state.epoch + 1} after {state.epoch_step} of its {per_epoch} steps "
                        f"({state.step} in all)  train -ELBO so far {loss / max(images, 1):8.2f}")
                break
            _check(watch, checked, state, saver)
            state.seconds += time.perf_counter() - start
            _end_epoch(config, vae, optimizer, data, state, saver, board, log if not quiet else None, world)
    stops.report(state, saver.path, log if not quiet else None)
    return state


class _Stepper:
    """One optimizer step on a batch: the step replayed as a CUDA graph where ``train.cuda_graph``
    allows it and the batch has the full size; the whole step as one compiled graph where the loss
    is compiled (:meth:`pyrovae.compiled.TracedLoss.step`, one process); else :func:`train_step`."""

    def __init__(self, t: TrainConfig, loss_fn, optimizer, full: int, device: torch.device, log):
        from pyrovae.compiled import TracedLoss, whole_step_only

        self.t, self.loss_fn, self.optimizer, self.full, self.log = t, loss_fn, optimizer, full, log
        self.graph = t.cuda_graph in (True, "auto") and device.type == "cuda"
        if self.graph and whole_step_only(loss_fn):  # such a capture has not been checked on a GPU yet
            log("note: train.cuda_graph: this objective's steps are not captured yet; this run takes eager steps")
            self.graph = False
        self.replayed = None  # captured again when the learning rate (a constant of the graph) changes
        self.whole = isinstance(loss_fn, TracedLoss) and not self.graph  # a CUDA graph captures the step itself

    def __call__(self, x: torch.Tensor, kl_weight: float) -> StepResult:
        if self.graph and x.shape[0] == self.full:
            self._capture(x)
            if self.graph:
                return self.replayed(x, kl_weight)
        if self.whole:  # the loss compiled, in one process: the whole step is one graph
            return self.loss_fn.step(self.optimizer, x, kl_weight, grad_clip=self.t.grad_clip,
                                     skip_norm=self.t.skip_grad_norm)
        return train_step(self.loss_fn, self.optimizer, x, kl_weight=kl_weight, grad_clip=self.t.grad_clip,
                          skip_norm=self.t.skip_grad_norm)

    def _capture(self, x: torch.Tensor) -> None:
        """The CUDA-graph step for batches like ``x``: the one captured before, unless the learning
        rate has changed since. Where the step cannot be captured, one line says why and the run
        takes eager steps."""
        from pyrovae.compiled import CaptureUnsupported, StaticStep

        lr = self.optimizer.param_groups[0]["lr"]
        if self.replayed is not None and self.replayed.lr == lr:
            return
        try:
            self.replayed = StaticStep(self.loss_fn, self.optimizer, x, grad_clip=self.t.grad_clip,
                                       skip_norm=self.t.skip_grad_norm)
            self.replayed.lr = lr
        except CaptureUnsupported as e:
            self.log(f"note: train.cuda_graph: {e}; this run takes eager steps")
            self.graph, self.replayed = False, None


class _Stops:
    """Whether to stop: a signal (SIGINT/SIGTERM) or the wall-clock budget (``train.max_seconds``).

    One process looks at its own flags after every step. Several processes must stop at the same
    step, so they agree (one small all-reduce and a host read) only every ``train.log_every_steps``
    steps and at each epoch's last step, never in between: no host read per step under torchrun.
    """

    def __init__(self, t: TrainConfig, world: World, device: torch.device, steps_per_epoch: int):
        self.t, self.world, self.device, self.steps_per_epoch = t, world, device, steps_per_epoch
        self.deadline = time.monotonic() + t.max_seconds if t.max_seconds is not None else None
        self.signal, self.out_of_time = 0, False

    @property
    def now(self) -> bool:
        return bool(self.signal) or self.out_of_time

    def agree(self, state: TrainState, signals: list[int]) -> bool:
        late = self.deadline is not None and time.monotonic() >= self.deadline
        mine = signals[0] if signals else 0
        if not self.world.active:
            self.signal, self.out_of_time = mine, late
        elif state.step % self.t.log_every_steps == 0 or state.epoch_step == self.steps_per_epoch:
            self.signal = self.world.max(mine, self.device)
            self.out_of_time = bool(self.world.max(int(late), self.device))
        return self.now

    def report(self, state: TrainState, checkpoint: Path | None, log) -> None:
        """After the loop: a signal ends the command (:class:`Interrupted`); a spent time budget is said."""
        kept = f"checkpoint written to {checkpoint}" if checkpoint is not None else "no checkpoint kept"
        if self.signal:
            raise Interrupted(self.signal, f"stopped by {signal.Signals(self.signal).name} at epoch "
                                           f"{state.epoch + 1}, step {state.epoch_step} of the epoch; {kept}")
        if self.out_of_time and log is not None:
            log(f"stopped: train.max_seconds ({self.t.max_seconds:g} s) spent after {state.step} steps; {kept}")


def _end_epoch(config: Config, vae, optimizer, data: Prepared, state: TrainState, saver: Checkpointer, board, log,
               world: World) -> None:
    """The test figures of the epoch just trained (evaluation mode), its row, its checkpoint."""
    t = config.train
    vae.eval()  # the test figures in evaluation mode (batch-norm statistics untouched)
    test = evaluate(vae, data.test, seed=config.data.test_binarization_seed, world=world)
    row = state.end_epoch(epoch_totals(state, world), test, learning_rate(t, state.epoch))
    saver.save(state, vae=vae, optimizer=optimizer, config=config, device=data.train.device)
    if board is not None and world.main:
        board.epoch(row, vae, data.test, seed=t.seed)
    if log is not None:
        skipped = f", {row['skipped_steps']} updates skipped" if row.get("skipped_steps") else ""
        log(f"epoch {row['epoch']:3d}  train -ELBO {row['train_neg_elbo']:8.2f}  test -ELBO "
            f"{row['test_neg_elbo']:8.2f} nats/image  ({row['seconds']:.2f} s{skipped})")


def _progress(quiet: bool):
    """A progress bar, shown only on a terminal; updated by hand, one tick a step."""
    return progress(quiet=quiet, unit="batch")


def _budget_spent(t: TrainConfig, state: TrainState) -> bool:
    return t.max_steps is not None and state.step >= t.max_steps


def _set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:  # a function of the epoch, so resuming sets it again exactly
        group["lr"] = lr


def _check(watch: NonFiniteWatch, checked: int, state: TrainState, saver: Checkpointer) -> int:
    """Read the non-finite flags of the steps after step ``checked`` of the epoch (one host read); on a
    bad one say where and which checkpoint is still good. Returns the step checked up to."""
    try:
        watch.check(checked + 1, f"epoch {state.epoch + 1}, ")
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e}; training stopped. {saver.last_good()}. Try a lower --lr, or set "
                                 "train.grad_clip") from None
    return state.epoch_step
