"""Data-parallel training and evaluation over several processes, with ``torch.distributed``.

Launched by ``torchrun`` (one process per GPU, or several on the CPU)::

    torchrun --nproc_per_node 2 -m pyrovae train --config experiments/configs/mnist.toml

Without torchrun nothing here does anything: :class:`World` is one process of rank 0.

The convention (what keeps one process and N processes on the same objective):

- ``train.batch_size`` is the **global** batch: each step, the N processes together take the batch
  a single process would take, each its own contiguous part of it (``batch_size / N`` images, the
  last batch of an epoch split as evenly as it goes). A config therefore means the same run on any
  N, the learning rate included.
- The loss of each process is the -ELBO **summed** over its images, and the gradients are
  all-reduced by **sum**, not by mean (:func:`sum_gradients`): every process then holds the
  gradient of the -ELBO summed over the global batch, exactly what one process computes on it.
- The data order and the binarization draws come from one generator that every process runs in
  step: each draws the permutation and the binarization noise of the *global* batch and keeps its
  part, so the images and their binarization are those of the one-process run. The
  reparameterization noise is each process's own (rank 0's stream is the one-process stream).
"""

from __future__ import annotations

import datetime
import functools
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "CollectiveError", "launched", "start", "stop", "exit_now", "on_main", "shard", "sum_gradients", "wrap"]

#: How long a collective waits for the other processes before it fails (seconds); a process that
#: died makes the others fail after at most this long, instead of hanging.
DEFAULT_TIMEOUT_S = float(os.environ.get("PYROVAE_COLLECTIVE_TIMEOUT", "300"))


class CollectiveError(RuntimeError):
    """The other processes did not answer: one of them died, or the network failed."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run: rank, count, and its GPU (local rank)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether a process group is running (under torchrun, even with one process)."""
        return dist.is_available() and dist.is_initialized()

    # --- collectives (no-ops in one process) ---------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            _collective(dist.barrier)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place; returns it."""
        if self.active:
            _collective(dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max(self, value: int, device: torch.device) -> int:
        """The largest of the processes' ``value`` (one small all-reduce and a host read)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        _collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def seed_noise(self, seed: int) -> None:
        """Give each process its own reparameterization noise: rank 0 keeps the stream ``seed`` set
        (the one-process stream), rank r > 0 gets a stream of its own, the same on every run."""
        if self.rank > 0:
            torch.manual_seed(seed * 1_000_003 + self.rank)

    def from_main(self, fn):
        """``fn()`` run by rank 0 only, its result (or its error, raised again) handed to every process.
        ``fn`` must not itself call a collective: the other processes wait in this one."""
        if not self.active:
            return fn()
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except Exception as e:
                error = e
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order (picklable objects)."""
        if not self.active:
            return [obj]
        out = [None] * self.size
        _collective(dist.all_gather_object, out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` in every process."""
        if not self.active:
            return obj
        box = [obj]
        _collective(dist.broadcast_object_list, box, src=0)
        return box[0]


def on_main(fn):
    """Decorator for rank-0 work: the function runs on rank 0 only, and its result (or its error,
    raised again) reaches every process of the ``world`` keyword it is called with (one process when
    none is given). It must not itself call a collective: the other processes wait in this one."""
    @functools.wraps(fn)
    def on_rank_zero(*args, world: World = World(), **kwargs):
        return world.from_main(lambda: fn(*args, **kwargs))
    return on_rank_zero


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:
        raise CollectiveError(
            f"rank {dist.get_rank()} lost the other processes ({type(e).__name__}: {str(e).splitlines()[0]}): "
            "one of them died or the network failed. The last checkpoint is intact; resume the run with "
            "the same torchrun command and --resume") from None


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def start(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[World, torch.device]:
    """Join the process group torchrun set up: gloo on the CPU, NCCL on CUDA with one GPU per process
    (``LOCAL_RANK`` picks it). Returns the world and this process's device; without torchrun, one
    process and ``device`` unchanged."""
    if not launched():
        return World(), device
    rank, size, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return World(rank, size, local), device


def stop() -> bool:
    """Leave the process group (at the end of a command); whether there was one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def exit_now(code: int):
    """End this process with ``code`` without finalizing the interpreter (after :func:`stop`).

    Gloo runs each collective on a worker thread of its own, and that thread drops its reference to
    the collective's tensors a moment after the caller has seen the result. A tensor whose Python
    object the caller has dropped by then is released through Python, so the thread must take the
    GIL. ``destroy_process_group`` does not join those threads; if the interpreter is already
    shutting down when one of them asks for the GIL, Python ends the thread inside C++ code that may
    not unwind, and the process aborts (SIGABRT, "terminate called without an active exception")
    after all its work is done, which torchrun reports as a failed job. The last collectives of a
    command (the broadcast after its files are written) are the ones at risk. Ending the process
    here, with its output flushed, leaves no interpreter shutdown for a worker thread to meet.
    Every file the commands write is complete by then (written and synced by
    :func:`pyrovae.atomic.atomic_write`).
    """
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def shard(n: int, world: World) -> slice:
    """This process's contiguous part of ``n`` items split as evenly as it goes over the world."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (1 if world.rank < extra else 0))


def sum_gradients(process_group, bucket):
    """DDP communication hook: all-reduce a bucket of gradients by sum (DDP's own default is the mean).

    The all-reduce is waited for here, and its result handed back in a future that is already
    complete. The asynchronous form, ``all_reduce(..., async_op=True).get_future().then(fn)``, gives
    the collective's worker thread (gloo's, on the CPU) the last reference to the Python function
    ``fn``: the thread releases it after DDP has read the result, and must take the GIL to do so. When
    the process is already shutting its interpreter down by then (a short command that ends right
    after its last step), the thread cannot take the GIL, is made to exit inside C++ code that may
    not unwind, and the whole process aborts with "terminate called without an active exception"
    (SIGABRT) after finishing its work. Without a Python continuation no worker thread ever touches
    Python.
    """
    buffer = bucket.buffer()
    dist.all_reduce(buffer, group=process_group)
    done = torch.futures.Future(devices=[buffer.device] if buffer.device.type == "cuda" else None)
    done.set_result(buffer)
    return done


def wrap(loss_fn: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``loss_fn`` inside ``DistributedDataParallel`` with summed gradients; unchanged in one process.

    The loss module owns the VAE, so the backward pass of any objective (Pyro's or the hand-coded
    one) all-reduces every parameter's gradient.
    """
    if not world.active:
        return loss_fn
    from torch.nn.parallel import DistributedDataParallel

    # the buffers are constants here: synced once, at the start, never again (the option's name
    # changed in torch 2.14)
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    ddp = DistributedDataParallel(loss_fn, device_ids=[device] if device.type == "cuda" else None, **{sync: False})
    ddp.register_comm_hook(None, sum_gradients)
    return ddp
