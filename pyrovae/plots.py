"""Figures of a run, and the plotting basics the lecture's figures share. With
:mod:`pyrovae.lecture.figures`, the only module that imports matplotlib (file-only Agg backend)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["loss_curve", "image_grid", "manifold_grid", "latent_scatter", "curves", "save"]


def _tile(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (H', W', C) picture with a 1-pixel gap."""
    from torchvision.utils import make_grid

    return make_grid(images.detach().cpu().float(), nrow=nrow, padding=1, pad_value=1.0).permute(1, 2, 0)


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG, atomically (a failed write leaves the old picture, and says why)."""
    from pyrovae.atomic import atomic_write

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buffer.getbuffer())
    return Path(path)


def loss_curve(history: list[dict], path, title: str = "") -> Path:
    """Train and test -ELBO per image against epochs."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [h["train_neg_elbo"] for h in history], label="train (running mean over the epoch)")
    ax.plot(epochs, [h["test_neg_elbo"] for h in history], label="test (fixed inputs)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("-ELBO per image (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def image_grid(images: torch.Tensor, path, nrow: int, title: str = "") -> Path:
    pic = _tile(images, nrow).numpy()
    fig, ax = plt.subplots(figsize=(nrow * 0.5, pic.shape[0] / pic.shape[1] * nrow * 0.5 + 0.3))
    ax.imshow(pic.squeeze(-1) if pic.shape[-1] == 1 else pic, cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def manifold_grid(vae, path, n: int = 20) -> Path:
    """Decode an n x n grid of Gaussian quantiles of a 2-D code (Kingma and Welling 2014, figure 4)."""
    quantiles = torch.linspace(0.5 / n, 1 - 0.5 / n, n)
    values = torch.distributions.Normal(0.0, 1.0).icdf(quantiles)
    z1, z2 = torch.meshgrid(values, values.flip(0), indexing="xy")  # rows top to bottom: z2 high to low
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=-1)  # (n*n, 2)
    device = next(vae.parameters()).device
    images = vae.decode(z.to(device))
    return image_grid(images, path, nrow=n, title="learned manifold: decoded Gaussian quantiles of z")


def latent_scatter(codes: torch.Tensor, labels: torch.Tensor, path) -> Path:
    """Test-set means of q(z|x) in 2-D, coloured by class."""
    codes, labels = codes.detach().cpu().numpy(), labels.detach().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    points = ax.scatter(codes[:, 0], codes[:, 1], c=labels, cmap="tab10", s=2, alpha=0.7)
    fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
    ax.set_xlabel("$z_1$ (mean of q)")
    ax.set_ylabel("$z_2$ (mean of q)")
    ax.set_title("test-set codes")
    return save(fig, path)


def curves(series: dict[str, list[float]], path, ylabel: str, title: str = "", xlabel: str = "epoch",
           ylim: tuple[float, float] | None = None, logx: bool = False) -> Path:
    """Several curves against epochs (1, 2, ...), one per name."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), values, marker="o" if len(values) <= 50 else None, ms=3, label=name)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)
