"""A training run: config in, a folder of outputs out.

Outputs: ``config.json``, ``metrics.json`` (per epoch and provenance), ``checkpoint.pt``,
``loss_curve.png``, ``reconstructions.png``, ``samples.png``, and for a 2-D latent space
``manifold.png`` and ``latent_scatter.png``.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import pyro
import torch

from pyrovae.checkpoint import atomic_write, save_checkpoint
from pyrovae.config import Config
from pyrovae.data import batches, binarize, load_dataset
from pyrovae.evaluate import evaluate
from pyrovae.model import build_vae
from pyrovae.objectives import build_objective
from pyrovae.train import make_optimizer, resolve_device, train_epoch

__all__ = ["RunFolderError", "train_run", "provenance", "write_json", "write_figures", "prepare_data"]


class RunFolderError(FileExistsError):
    """The output folder already holds another run."""


def provenance(device: torch.device | str | None = None) -> dict:
    """Versions, device, git commit and command line, saved beside every result."""
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "pyro": pyro.__version__, "torchvision": torchvision.__version__},
        "device": str(device) if device is not None else None,
        "cpu_threads": torch.get_num_threads(),
        "git_commit": commit,
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def write_json(path, obj) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def prepare_data(config: Config, device: torch.device, download: bool = True):
    """(train images on the device, binary test images on the device, test labels)."""
    d, t = config.data, config.train
    train = load_dataset(d.dataset, d.data_dir, train=True, download=download, device=device)
    test = load_dataset(d.dataset, d.data_dir, train=False, download=download, device="cpu")
    train_images = train.images[: t.train_subset] if t.train_subset else train.images
    test_images, test_labels = test.images, test.labels
    if t.test_subset:
        test_images, test_labels = test_images[: t.test_subset], test_labels[: t.test_subset]
    # the test set is binarized once, on the CPU, from a fixed seed: the same for every run and device
    test_binary = binarize(test_images, torch.Generator().manual_seed(d.test_binarization_seed)).to(device)
    if d.binarization == "static":
        train_images = binarize(train_images.cpu(), torch.Generator().manual_seed(t.seed)).to(device)
    return train_images, test_binary, test_labels


def _check_out_dir(out: Path, overwrite: bool) -> None:
    markers = [p for p in ("config.json", "metrics.json", "checkpoint.pt") if (out / p).exists()]
    if markers and not overwrite:
        raise RunFolderError(
            f"{out} already holds a run ({', '.join(markers)}); choose another --out folder, "
            "or pass --overwrite to replace it"
        )


def train_run(config: Config, out_dir, *, quiet: bool = False, overwrite: bool = False,
              download: bool = True, log=print) -> dict:
    """Train the configured VAE and write every output into ``out_dir``; returns the metrics."""
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    device = resolve_device(config.train.device)
    train_images, test_binary, test_labels = prepare_data(config, device, download)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.json")

    t = config.train
    pyro.set_rng_seed(t.seed)  # initialization and reparameterization noise
    data_rng = torch.Generator(device=device).manual_seed(t.seed + 1)  # data order and binarization
    vae = build_vae(config.model, tuple(train_images.shape[1:])).to(device)
    loss_fn = build_objective(t.objective, vae)
    optimizer = make_optimizer(vae.parameters(), t.lr, device)
    first = next(batches(train_images[: t.batch_size], t.batch_size, torch.Generator(device=device),
                         config.data.binarization))
    vae.check_data(first)  # once, here: the loop feeds only batches cut from this same tensor

    metrics = {"config": config.to_dict(), "seed": t.seed, **provenance(device),
               "units": "nats per image; test set binarized once with seed data.test_binarization_seed",
               "binarization": {"train": config.data.binarization, "test": "static (fixed seed)"},
               "epochs": []}
    num_batches = -(-train_images.shape[0] // t.batch_size)
    for epoch in range(1, t.epochs + 1):
        vae.train()
        with vae.inputs_checked():
            stats = train_epoch(loss_fn, optimizer,
                                batches(train_images, t.batch_size, data_rng, config.data.binarization),
                                num_batches=num_batches, progress=None if not quiet else False,
                                description=f"epoch {epoch}/{t.epochs}")
        vae.eval()
        test = evaluate(vae, test_binary, seed=config.data.test_binarization_seed)
        row = {"epoch": epoch, "train_neg_elbo": stats["loss"], "test_neg_elbo": test["neg_elbo"],
               "test_reconstruction": test["reconstruction"], "test_kl": test["kl"],
               "seconds": stats["seconds"]}
        metrics["epochs"].append(row)
        if not quiet:
            log(f"epoch {epoch:3d}  train -ELBO {row['train_neg_elbo']:8.2f}  test -ELBO "
                f"{row['test_neg_elbo']:8.2f} nats/image  ({row['seconds']:.2f} s)")
        save_checkpoint(out / "checkpoint.pt", vae=vae, optimizer=optimizer, config=config, epoch=epoch,
                        extra={"metrics": metrics["epochs"]})
        write_json(out / "metrics.json", metrics)

    write_figures(vae, out, metrics["epochs"], test_binary, test_labels, seed=t.seed)
    return metrics


@torch.no_grad()
def write_figures(vae, out: Path, history, test_binary, test_labels, seed: int = 0) -> None:
    from pyrovae import plots

    vae.eval()
    if history:
        plots.loss_curve(history, out / "loss_curve.png", title="-ELBO per image")
    inputs = test_binary[:16]
    plots.image_grid(torch.cat([inputs, vae.reconstruct(inputs)]), out / "reconstructions.png", nrow=16,
                     title="test images (top) and reconstructions E[x|z=mean of q(z|x)] (bottom)")
    with torch.random.fork_rng(devices=[test_binary.device] if test_binary.device.type == "cuda" else []):
        torch.manual_seed(seed)
        plots.image_grid(vae.sample(64), out / "samples.png", nrow=8, title="E[x|z], z ~ p(z)")
    if vae.prior().event_shape == (2,):
        plots.manifold_grid(vae, out / "manifold.png")
        codes = torch.cat([vae.encode(test_binary[i:i + 1000]) for i in range(0, len(test_binary), 1000)])
        plots.latent_scatter(codes, test_labels, out / "latent_scatter.png")
