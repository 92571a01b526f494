"""Seconds per training epoch of the default MNIST VAE, three ways, interleaved in one run.

1. ``pyrovae``: our loop (``PyroELBO`` = Pyro's ``Trace_ELBO`` as a loss module, fused Adam, the
   dataset as one device tensor, dynamic binarization per batch).
2. ``stock``: a VAE of the same shape written the way Pyro's tutorial example is (``pyro.module``
   registration, ``SVI`` with ``pyro.optim.Adam``, a torch ``DataLoader`` over torchvision's MNIST
   with a per-item ``ToTensor`` transform, probabilities through a sigmoid, ``exp`` scale).
3. ``torch``: the same computation hand-written in plain PyTorch (no Pyro), a floor for the others.

Epochs of the three alternate (1, 2, 3, 1, 2, 3, ...) so that a noisy machine slows them alike; the
script prints the median epoch of each and the ratios between them. Our loop runs as ``fit`` runs it:
the data checked once, then Pyro's validation off.

    python experiments/benchmarks/benchmark_epoch.py --rounds 5
    python experiments/benchmarks/benchmark_epoch.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.nn import functional as F

from pyrovae.config import Config
from pyrovae.data import batches, binarize, data_root, load_mnist
from pyrovae.engine import make_optimizer, train_step
from pyrovae.experiment import add_output_flags, output_folders
from pyrovae.model import build_vae
from pyrovae.objectives import PyroELBO
from pyrovae.runs import provenance, write_json

OUT = "results/benchmark_epoch"


def pyrovae_epoch_fn(train_images, batch_size, limit):
    vae = build_vae(Config().model)
    loss_fn, opt = PyroELBO(vae), make_optimizer(vae.parameters(), 1e-3, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    vae.check_data(binarize(train_images[:batch_size], torch.Generator().manual_seed(0)))  # once, as fit does

    def epoch():
        start = time.perf_counter()
        with pyro.validation_enabled(False):
            for x in _limit(batches(train_images, batch_size, g), limit):
                train_step(loss_fn, opt, x)
        return time.perf_counter() - start
    return epoch


class _StockEncoder(nn.Module):
    def __init__(self, z_dim=50, hidden=400):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, hidden), nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)

    def forward(self, x):
        h = F.softplus(self.fc1(x.reshape(-1, 784)))
        return self.fc21(h), torch.exp(self.fc22(h))


class _StockDecoder(nn.Module):
    def __init__(self, z_dim=50, hidden=400):
        super().__init__()
        self.fc1, self.fc21 = nn.Linear(z_dim, hidden), nn.Linear(hidden, 784)

    def forward(self, z):
        return torch.sigmoid(self.fc21(F.softplus(self.fc1(z))))


def stock_epoch_fn(root, batch_size, limit):
    from torchvision import datasets, transforms

    encoder, decoder = _StockEncoder(), _StockDecoder()

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], 50), x.new_ones(x.shape[0], 50)).to_event(1))
            pyro.sample("obs", dist.Bernoulli(decoder(z), validate_args=False).to_event(1), obs=x.reshape(-1, 784))

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = encoder(x)
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    train = datasets.MNIST(str(root), train=True, download=False, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True)

    def epoch():
        start = time.perf_counter()
        for x, _ in _limit(loader, limit):
            svi.step(torch.bernoulli(x))
        return time.perf_counter() - start
    return epoch


def torch_epoch_fn(train_images, batch_size, limit):
    enc = nn.Sequential(nn.Linear(784, 400), nn.Softplus(), nn.Linear(400, 100))
    dec = nn.Sequential(nn.Linear(50, 400), nn.Softplus(), nn.Linear(400, 784))
    opt = make_optimizer([*enc.parameters(), *dec.parameters()], 1e-3, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)

    def step(x):
        x = x.flatten(1)
        loc, raw = enc(x).chunk(2, -1)
        scale = F.softplus(raw) + 1e-4
        z = loc + scale * torch.randn_like(scale)
        log_px = -F.binary_cross_entropy_with_logits(dec(z), x, reduction="sum")
        kl = (0.5 * (loc**2 + scale**2 - 1) - scale.log()).sum()
        loss = kl - log_px
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def epoch():
        start = time.perf_counter()
        for x in _limit(batches(train_images, batch_size, g), limit):
            step(x)
        return time.perf_counter() - start
    return epoch


def _limit(iterable, n):
    for i, item in enumerate(iterable):
        if n is not None and i >= n:
            return
        yield item


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="epochs of each method (after one warm-up each)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-dir", default=None)
    add_output_flags(p, out=OUT, smoke="3 batches per epoch, 1 round")
    args = p.parse_args(argv)

    root = data_root(args.data_dir)
    train_images = load_mnist(root, train=True, download=False).images
    limit = 3 if args.smoke else None
    rounds = 1 if args.smoke else args.rounds
    torch.manual_seed(0)
    methods = {"pyrovae": pyrovae_epoch_fn(train_images, args.batch_size, limit),
               "stock": stock_epoch_fn(root, args.batch_size, limit),
               "torch": torch_epoch_fn(train_images, args.batch_size, limit)}
    times = {name: [] for name in methods}
    for r in range(rounds + 1):
        for name, epoch in methods.items():
            seconds = epoch()
            if r > 0:  # round 0 warms up
                times[name].append(seconds)
        if r > 0:
            print(f"round {r}: " + "  ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {"pyrovae/stock": median["pyrovae"] / median["stock"],
              "pyrovae/torch": median["pyrovae"] / median["torch"],
              "stock/torch": median["stock"] / median["torch"]}
    for name, m in median.items():
        print(f"median epoch {name:8s} {m:.2f} s")
    for name, r in ratios.items():
        print(f"ratio {name:14s} {r:.2f}")
    with output_folders(args.smoke, args.out, default_out=OUT) as folders:
        folders.out.mkdir(parents=True, exist_ok=True)
        write_json(folders.out / "results.json", {"batch_size": args.batch_size, "epoch_seconds": times,
                                                  "median_seconds": median, "ratios": ratios, **provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
