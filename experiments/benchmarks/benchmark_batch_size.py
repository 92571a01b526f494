"""How does the cost of a training step per image change with the batch size, for one config?

Builds the config's VAE for its image shape, and times ``train_step`` with the ``meanfield``
objective on random 8-bit images at each batch size: two warm-up steps, then steps covering about
1,024 images, the faster of ``--rounds`` rounds. Prints milliseconds per image and step, and each
batch size's cost as a ratio to the cheapest (ratios are what carry from one machine to another).

    python experiments/benchmarks/benchmark_batch_size.py --config experiments/configs/cifar10.toml
    python experiments/benchmarks/benchmark_batch_size.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time

import pyro
import torch

from pyrovae import Config, build_vae
from pyrovae.engine import make_optimizer, train_step
from pyrovae.objectives import build_objective

SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "lfw": (3, 64, 64)}


def per_image_ms(config: Config, shape: tuple[int, ...], batch: int, images: int) -> float:
    """Milliseconds per image of one training step at ``batch`` images, over about ``images`` images."""
    torch.manual_seed(0)
    vae = build_vae(config.model, image_shape=shape)
    loss = build_objective("meanfield", vae)
    optimizer = make_optimizer(vae.parameters(), 1e-3, torch.device("cpu"))
    x = torch.rand(batch, *shape).mul(255).round().div(255)
    if config.model.likelihood == "bernoulli":
        x = x.round()
    with pyro.validation_enabled(False):
        for _ in range(2):
            train_step(loss, optimizer, x)
        steps = max(2, images // batch)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(loss, optimizer, x)
    return (time.perf_counter() - start) / steps / batch * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/configs/cifar10.toml")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--images", type=int, default=1024, help="images timed per batch size and round")
    p.add_argument("--smoke", action="store_true", help="the default MNIST model, two small batches, one round")
    args = p.parse_args(argv)
    if args.smoke:
        config, sizes, rounds, images = Config().replace(model={"hidden": (32,), "z_dim": 4}), [8, 16], 1, 32
    else:
        config, sizes, rounds, images = Config.load(args.config), args.batch_sizes, args.rounds, args.images
    shape = SHAPES.get(config.data.dataset, (3, 32, 32))
    times = {b: min(per_image_ms(config, shape, b, images) for _ in range(rounds)) for b in sizes}
    cheapest = min(times.values())
    print(f"{args.config if not args.smoke else 'smoke'}: {shape}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for b, ms in times.items():
        print(f"batch {b:4d}: {ms:7.2f} ms per image and step, ratio to the cheapest {ms / cheapest:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
