"""The data stream: which images each step trains on, a function of (seed, epoch, step) alone.

The order of an epoch is a permutation drawn on the CPU from (seed, epoch), as torch's
``DistributedSampler`` draws its own, and each step's binarization comes from a generator on the
data's device seeded from (seed, epoch, step). So the same seed takes the same images in the same
order on the CPU, on CUDA and on any number of processes (each takes its part of the global batch,
prepared whole, see :mod:`pyrovae.distributed`), and a resume part-way through an epoch starts at its
step with nothing to replay. The binarization draws themselves differ between kinds of device.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch

from pyrovae.data import Prepared
from pyrovae.distributed import World, shard

__all__ = ["stream_seed", "steps_per_epoch", "epoch_batches"]


def stream_seed(seed: int, epoch: int, step: int | None = None) -> int:
    """The seed of an epoch's order (``step`` None) or of one step's binarization draws: a hash of
    the run's seed and the position, so that nearby positions get unrelated streams."""
    key = f"{seed}/{epoch}" + ("" if step is None else f"/{step}")
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def steps_per_epoch(images: int, batch_size: int, world: World = World()) -> int:
    """Optimizer steps in an epoch of ``images``: a last batch too small to give every process an
    image is dropped."""
    return images // batch_size + (images % batch_size >= world.size)


def epoch_batches(data: Prepared, batch_size: int, seed: int, epoch: int, first_step: int = 0,
                  world: World = World()) -> Iterator[torch.Tensor]:
    """This process's part of each batch of epoch ``epoch`` (counted from 0), from step ``first_step`` on."""
    n, device = data.train.shape[0], data.train.device
    order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(seed, epoch)))
    order, draws = order.to(device), torch.Generator(device=device)
    for step in range(first_step, -(-n // batch_size)):
        batch = torch.index_select(data.train, 0, order[step * batch_size:(step + 1) * batch_size])  # whole rows
        if data.per_batch is not None:
            batch = data.per_batch(batch, draws.manual_seed(stream_seed(seed, epoch, step)))
        if batch.shape[0] >= world.size:  # a last batch too small to give every process an image is dropped
            yield batch[shard(batch.shape[0], world)]
