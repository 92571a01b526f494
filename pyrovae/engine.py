"""The training engine: one optimizer step, and one loop over one checkpointable state.

``train_step`` (from :mod:`pyrovae.step`) takes a loss module (``loss(x, kl_weight=beta)`` -> the
negative ELBO summed over the batch: a Pyro objective or the hand-coded one) through one Adam step
without reading anything back from the device: the loss stays a device tensor, and the non-finite
guard is a device flag that the fused Adam kernel reads itself (``found_inf``, the mechanism
``torch.amp.GradScaler`` uses), skipping the update on the device when the loss or a gradient is
NaN or infinite.

``fit`` is the loop. Everything it needs to go on after a stop lives in one :class:`TrainState`,
which is what a checkpoint holds beside the module and optimizer states, so a run trained in pieces
has the same parameters and metrics as one trained straight through. The loop reads the device's
flags at most once per ``train.log_every_steps`` steps, before every checkpoint and at the end of an
epoch. It knows nothing of run folders (see :mod:`pyrovae.runs`): it writes only the checkpoint file
it is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pyro
import torch

from pyrovae.checkpoint import load_checkpoint, save_checkpoint
from pyrovae.config import Config, TrainConfig
from pyrovae.data import Prepared, batches
from pyrovae.distributed import World, shard
from pyrovae.evaluate import evaluate
from pyrovae.progress import progress
from pyrovae.step import StepResult, _parameters, train_step

__all__ = ["train_step", "fit", "TrainState", "StepResult", "NonFiniteWatch", "make_optimizer", "resolve_device",
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


# --- the state a checkpoint holds ----------------------------------------------------------------
def stream_seed(seed: int, epoch: int, step: int | None = None) -> int:
    """The seed of an epoch's order (``step`` None) or of one step's binarization draws: a hash of
    the run's seed and the position, so that nearby positions get unrelated streams."""
    key = f"{seed}/{epoch}" + ("" if step is None else f"/{step}")
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1
@dataclass
class TrainState:
    """Where a run stands: with the module and optimizer states, everything a resume needs."""

    seed: int = 0  # the run's seed: the data stream is a function of (seed, epoch, step) (epoch_batches)
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

    @classmethod
    def start(cls, seed: int, device: torch.device, data: dict | None = None) -> "TrainState":
        return cls(seed=seed, loss_sum=torch.zeros((), dtype=torch.float64, device=device), data=data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, device: torch.device) -> "TrainState":
        skipped = d.get("skipped")  # absent from checkpoints written before train.skip_grad_norm
        return cls(**{**d, "loss_sum": d["loss_sum"].to(device),
                      "skipped": None if skipped is None else skipped.to(device)})

    def epoch_batches(self, data: Prepared, batch_size: int, world: World = World()) -> Iterator[torch.Tensor]:
        """This process's part of each batch of the current epoch not yet trained on.

        The data stream belongs to the seed, not to the device: the epoch's order is a permutation
        drawn on the CPU from (seed, epoch), as torch's ``DistributedSampler`` draws its own, and each
        step's binarization comes from a generator on the data's device seeded from (seed, epoch,
        step). So the same seed takes the same images in the same order on the CPU, on CUDA and on
        any number of processes (each takes its part of the global batch, prepared whole, see
        :mod:`pyrovae.distributed`), and a resume part-way through an epoch starts at its step with
        nothing to replay. The binarization draws themselves differ between kinds of device.
        """
        n, device = data.train.shape[0], data.train.device
        order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(self.seed, self.epoch)))
        order, draws = order.to(device), torch.Generator(device=device)
        for step in range(self.epoch_step, -(-n // batch_size)):
            batch = data.train[order[step * batch_size:(step + 1) * batch_size]]
            if data.per_batch is not None:
                batch = data.per_batch(batch, draws.manual_seed(stream_seed(self.seed, self.epoch, step)))
            if batch.shape[0] >= world.size:  # a last batch too small to give every process an image is dropped
                yield batch[shard(batch.shape[0], world)]

    def record(self, result: StepResult, images: int) -> None:
        self.step += 1
        self.epoch_step += 1
        self.loss_sum += result.loss.double()  # stays on the device
        self.skipped = result.too_large.long() + (0 if self.skipped is None else self.skipped.to(result.loss.device))
        self.images += images

    def totals(self, world: World) -> tuple[float, int, int]:
        """The epoch's -ELBO sum, image count and skipped updates so far, over all processes (host reads)."""
        skipped = self.loss_sum.new_tensor(0.0) if self.skipped is None else self.skipped.to(self.loss_sum)
        both = torch.stack([self.loss_sum, self.loss_sum.new_tensor(float(self.images)), skipped / world.size])
        loss, images, skipped = world.sum_(both.clone()).tolist()  # every process skips the same steps
        return loss, int(images), round(skipped)

    def summed(self, world: World) -> "TrainState":
        """A copy holding the epoch's sums over all processes (what a checkpoint holds)."""
        loss, images, skipped = self.totals(world)
        return dataclasses.replace(self, loss_sum=torch.tensor(loss, dtype=torch.float64), images=images,
                                   skipped=torch.tensor(skipped), world_size=world.size)

    def end_epoch(self, test: dict, lr: float, world: World = World()) -> dict:
        loss, images, skipped = self.totals(world)
        self.epoch += 1
        row = {"epoch": self.epoch, "train_neg_elbo": loss / max(images, 1),
               "test_neg_elbo": test["neg_elbo"], "test_reconstruction": test["reconstruction"],
               "test_kl": test["kl"], **({"test_bits_per_dim": test["bits_per_dim"]} if "bits_per_dim" in test else {}),
               "seconds": self.seconds, "steps": self.step, "lr": lr, **({"skipped_steps": skipped} if skipped else {})}
        self.history.append(row)
        self.epoch_step, self.images, self.seconds, self.skipped = 0, 0, 0.0, None
        self.loss_sum = torch.zeros_like(self.loss_sum)
        return row

    def save(self, path: Path | None, config: Config, vae, optimizer, device: torch.device,
             world: World = World()) -> None:
        """Write the checkpoint (rank 0; the others hand it their noise generators and their sums)."""
        if path is None:
            return
        self.noise_rng = {"torch": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        noise = world.gather(self.noise_rng)
        saved = dataclasses.replace(self.summed(world), rank_noise_rng=noise if world.size > 1 else None)
        if world.main:
            save_checkpoint(path, vae=vae, optimizer=optimizer, config=config, state=saved.to_dict())
        world.barrier()  # no process goes on before the checkpoint is in place

    def resumed_by(self, world: World) -> "TrainState":
        """A state loaded from a checkpoint, as this process resumes it: rank 0 carries the epoch's sums
        (the checkpoint holds the totals of all processes), and each process its own noise generators
        when the number of processes is the one that saved them."""
        if not world.main:
            self.loss_sum, self.images, self.skipped = torch.zeros_like(self.loss_sum), 0, None
        if self.rank_noise_rng is not None and len(self.rank_noise_rng) == world.size:
            self.noise_rng = self.rank_noise_rng[world.rank]
        elif not world.main:
            self.noise_rng = None  # a different number of processes: a fresh stream (not bit-exact)
        return self

    def restore_noise(self, device: torch.device) -> None:
        """Resuming: the reparameterization noise goes on from where it stopped."""
        if self.noise_rng is not None:
            torch.set_rng_state(self.noise_rng["torch"])
            if device.type == "cuda" and self.noise_rng["cuda"] is not None:
                torch.cuda.set_rng_state(self.noise_rng["cuda"], device)


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
        checkpoint: Path | None = None, quiet: bool = False, log=print, board=None,
        world: World = World()) -> TrainState:
    """Train ``vae`` through ``loss_fn`` to ``config.train``'s budget; checkpoint to ``checkpoint``;
    log to ``board`` (a :class:`pyrovae.board.Board`) when given. Under torchrun every process runs
    this loop on its part of each batch (``loss_fn`` wrapped by :func:`pyrovae.distributed.wrap`)."""
    t, device = config.train, data.train.device
    state = state or TrainState.start(t.seed, device)
    state.restore_noise(device)
    quiet = quiet or not world.main
    watch = NonFiniteWatch(parameter_names(loss_fn, optimizer), device)
    n, per_step = data.train.shape[0], t.batch_size
    steps_per_epoch = n // per_step + (n % per_step >= world.size)  # a last batch too small for the world is dropped
    vae.check_data(next(batches(data.train[: t.batch_size], t.batch_size, torch.Generator(device), data.per_batch)))
    step = _Stepper(t, loss_fn, optimizer, -(-t.batch_size // world.size), device, log)
    stops = _Stops(t, world, device, steps_per_epoch)
    with pyro.validation_enabled(False), _stop_on_signals() as signals, _progress(quiet) as bar:  # data checked
        while state.epoch < t.epochs and not _budget_spent(t, state) and not stops.now:
            _set_learning_rate(optimizer, learning_rate(t, state.epoch))
            vae.train()
            checked, start = state.epoch_step, time.perf_counter()
            for x in state.epoch_batches(data, t.batch_size, world):
                result = step(x, kl_weight_at(t, state.step))
                watch.add(result)
                state.record(result, x.shape[0])
                bar.update()
                stop = stops.agree(state, signals) or _budget_spent(t, state)
                save = stop or (t.checkpoint_every_steps is not None and state.step % t.checkpoint_every_steps == 0)
                if save or state.step % t.log_every_steps == 0:
                    checked = _check(watch, checked, state, checkpoint)
                    if board is not None and world.main:
                        board.step(state.step, result.loss, x.shape[0], learning_rate(t, state.epoch),
                                   kl_weight_at(t, state.step - 1))
                if save:
                    state.seconds, start = state.seconds + time.perf_counter() - start, time.perf_counter()
                    state.save(checkpoint, config, vae, optimizer, device, world)
                if stop and state.epoch_step < steps_per_epoch:  # at the last batch, let the epoch end
                    break
            if state.epoch_step < steps_per_epoch:  # stopped inside the epoch (checkpoint written)
                loss, images, _ = state.totals(world)
                if not quiet:
                    log(f"stopped in epoch {state.epoch + 1} after {state.epoch_step} of its {steps_per_epoch} "
                        f"steps ({state.step} in all)  train -ELBO so far {loss / max(images, 1):8.2f}")
                break
            _check(watch, checked, state, checkpoint)
            state.seconds += time.perf_counter() - start
            _end_epoch(config, vae, optimizer, data, state, checkpoint, board, log if not quiet else None, world)
    stops.report(state, checkpoint, log if not quiet else None)
    return state


class _Stepper:
    """One optimizer step on a batch: the step replayed as a CUDA graph where ``train.cuda_graph``
    allows it and the batch has the full size, else the eager :func:`train_step`."""

    def __init__(self, t: TrainConfig, loss_fn, optimizer, full: int, device: torch.device, log):
        self.t, self.loss_fn, self.optimizer, self.full, self.log = t, loss_fn, optimizer, full, log
        self.graph = t.cuda_graph in (True, "auto") and device.type == "cuda"
        eager_only = getattr(getattr(loss_fn, "module", loss_fn), "eager_only", None)  # DDP wraps as .module
        if self.graph and eager_only:
            log(f"note: train.cuda_graph: {eager_only}; this run takes eager steps")
            self.graph = False
        self.replayed = None  # captured again when the learning rate (a constant of the graph) changes

    def __call__(self, x: torch.Tensor, kl_weight: float) -> StepResult:
        if self.graph and x.shape[0] == self.full:
            self._capture(x)
            if self.graph:
                return self.replayed(x, kl_weight)
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


def _end_epoch(config: Config, vae, optimizer, data: Prepared, state: TrainState, checkpoint, board, log,
               world: World) -> None:
    """The test figures of the epoch just trained (evaluation mode), its row, its checkpoint."""
    t = config.train
    vae.eval()  # the test figures in evaluation mode (batch-norm statistics untouched)
    row = state.end_epoch(evaluate(vae, data.test, seed=config.data.test_binarization_seed, world=world),
                          learning_rate(t, state.epoch), world)
    state.save(checkpoint, config, vae, optimizer, data.train.device, world)
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


def _check(watch: NonFiniteWatch, checked: int, state: TrainState, checkpoint: Path | None) -> int:
    """Read the non-finite flags of the steps after step ``checked`` of the epoch (one host read); on a
    bad one say where and which checkpoint is still good. Returns the step checked up to."""
    try:
        watch.check(checked + 1, f"epoch {state.epoch + 1}, ")
    except NonFiniteLossError as e:
        kept = "No checkpoint had been written yet"
        if checkpoint is not None and Path(checkpoint).is_file():
            saved = load_checkpoint(checkpoint)["state"]
            kept = f"The last good checkpoint (epoch {saved['epoch']}, step {saved['step']}) is kept in {checkpoint}"
        raise NonFiniteLossError(f"{e}; training stopped. {kept}. Try a lower --lr, or set train.grad_clip") from None
    return state.epoch_step
