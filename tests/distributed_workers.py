"""Programs the distributed tests start with torchrun: ``torchrun --nproc_per_node 2 THIS CASE OUT``.

Each process writes what it ends with into OUT (``rank<r>.pt``); the tests compare the files.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import synthetic_data  # noqa: E402
from pyrovae import Config, build_vae  # noqa: E402
from pyrovae import atomic  # noqa: E402
from pyrovae.distributed import exit_now, start, stop, wrap  # noqa: E402
from pyrovae.engine import make_optimizer, train_step  # noqa: E402
from pyrovae.evaluate import importance_log_likelihood  # noqa: E402
from pyrovae.objectives import build_objective  # noqa: E402
from pyrovae.runs import train_run  # noqa: E402

TINY = Config().replace(model={"z_dim": 4, "hidden": (32,)}, train={"batch_size": 100, "epochs": 2})
DATA = synthetic_data(n_train=610, n_test=100)  # 7 steps an epoch, the last one of 10 images


def one_step(world, device, out):
    """One step on this process's half of a fixed batch of 2B images, noise seeded per half."""
    objective, batch = sys.argv[3], 64
    torch.manual_seed(0)
    vae = build_vae(TINY.model)
    x = torch.bernoulli(torch.rand(2 * batch, 1, 28, 28, generator=torch.Generator().manual_seed(1)))
    loss_fn = wrap(build_objective(objective, vae, 3), world, device)
    optimizer = make_optimizer(vae.parameters(), 1e-3, device)
    torch.manual_seed(100 + world.rank)  # this half's reparameterization noise
    result = train_step(loss_fn, optimizer, x[world.rank * batch:(world.rank + 1) * batch], kl_weight=0.5)
    return {"params": vae.state_dict(), "loss": result.loss}


def train(world, device, out):
    """A run trained by all processes; records which process wrote which file."""
    writes = []
    write = atomic.atomic_write

    def recording(path, data):
        writes.append(str(path))
        write(path, data)
    atomic.atomic_write = recording
    import pyrovae.runs
    import pyrovae.checkpoint
    pyrovae.runs.atomic_write = pyrovae.checkpoint.atomic_write = recording
    run = train_run(TINY, out / "run", data=DATA, quiet=True, world=world)
    return {"params": run.vae.state_dict(), "metrics": run.metrics, "writes": writes}


def iwae(world, device, out):
    """IWAE-K of a fixed model on 250 test images, the batches shared out over the processes."""
    torch.manual_seed(0)
    vae = build_vae(TINY.model).eval()
    return importance_log_likelihood(vae, DATA.test.repeat(3, 1, 1, 1)[:250], k=20, batch_size=40, world=world)


if __name__ == "__main__":
    case, out = sys.argv[1], Path(sys.argv[2])
    world, device = start(torch.device("cpu"))
    try:
        result = {"one_step": one_step, "train": train, "iwae": iwae}[case](world, device, out)
        torch.save({"rank": world.rank, "size": world.size, **result}, out / f"rank{world.rank}.pt")
    finally:
        stop()
    exit_now(0)
