"""Figures of a run, and the plotting basics the lecture's figures share. With
:mod:`pyrovae.lecture.figures`, the only module that imports matplotlib (file-only Agg backend)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["loss_curve", "image_grid", "manifold_grid", "latent_scatter", "curves", "class_grid",
           "interpolation_grid", "save"]


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
    """Train and test -ELBO per image against epochs: in bits/dim where the epochs report it (8-bit
    images; the training figure converted by the same factor), else in nats."""
    epochs = [h["epoch"] for h in history]
    train, test = [h["train_neg_elbo"] for h in history], [h["test_neg_elbo"] for h in history]
    ylabel = "-ELBO per image (nats)"
    if history and all(h.get("test_bits_per_dim") is not None for h in history):
        per_nat = history[0]["test_bits_per_dim"] / history[0]["test_neg_elbo"]  # 1 / (dimensions * ln 2)
        train, test = [v * per_nat for v in train], [h["test_bits_per_dim"] for h in history]
        ylabel = "-ELBO (bits/dim)"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, train, label="train (running mean over the epoch)")
    ax.plot(epochs, test, marker="o" if len(epochs) <= 50 else None, ms=3, label="test (fixed inputs)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
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


def _labelled_columns(pic, ncol: int, names: list[str], row_names: list[str], rows: int, title: str, path) -> Path:
    """Show a tiled picture with a name under each column and one beside each row."""
    height, width = pic.shape[:2]
    fig, ax = plt.subplots(figsize=(ncol * 0.75 + 0.8, rows * 0.75 + 0.6))
    ax.imshow(pic.squeeze(-1) if pic.shape[-1] == 1 else pic, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([(i + 0.5) * width / ncol for i in range(ncol)], names, fontsize=7, rotation=30 if ncol > 10 else 0)
    ax.set_yticks([(i + 0.5) * height / rows for i in range(rows)], row_names, fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=9)
    return save(fig, path)


@torch.no_grad()
def class_grid(vae, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], path, per_class: int = 2,
               title: str = "") -> Path:
    """Test images and their reconstructions E[x|z = mean of q(z|x)], one column per class (label c
    named ``class_names[c]``): the first ``per_class`` images of each class, each above its
    reconstruction. Classes with fewer images than that are left out."""
    labels = labels.cpu()
    present = [c for c in range(len(class_names)) if int((labels == c).sum()) >= per_class]
    if not present:
        raise ValueError(f"no class has {per_class} images among the {len(labels)} given")
    columns = []
    for c in present:
        index = (labels == c).nonzero().flatten()[:per_class]
        x = images[index.to(images.device)]
        columns.append(torch.stack([x, vae.reconstruct(x)], dim=1).flatten(0, 1))  # image, reconstruction, ...
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: rows of one image (or reconstruction) per class
    rows = 2 * per_class
    pic = _tile(grid, len(present)).numpy()
    row_names = [name for _ in range(per_class) for name in ("test image", "reconstruction")]
    return _labelled_columns(pic, len(present), [class_names[c] for c in present], row_names, rows, title, path)


@torch.no_grad()
def interpolation_grid(vae, starts: torch.Tensor, ends: torch.Tensor, path, steps: int = 8, title: str = "") -> Path:
    """Latent-space interpolation: for each pair (start, end) of images, the row start image,
    E[x|z] along the straight line from the mean of q(z|start) to the mean of q(z|end) in ``steps``
    equal steps (both ends included), and the end image."""
    za, zb = vae.encode(starts), vae.encode(ends)  # (pairs, z_dim)
    t = torch.linspace(0, 1, steps, device=za.device).view(1, steps, 1)
    z = (1 - t) * za.unsqueeze(1) + t * zb.unsqueeze(1)  # (pairs, steps, z_dim)
    decoded = vae.decode(z.flatten(0, 1)).unflatten(0, (len(za), steps))
    rows = torch.cat([starts.unsqueeze(1), decoded, ends.unsqueeze(1)], dim=1)  # (pairs, steps + 2, C, H, W)
    pic = _tile(rows.flatten(0, 1), steps + 2).numpy()
    names = ["start"] + [f"t={v:.2f}".rstrip("0").rstrip(".") for v in torch.linspace(0, 1, steps).tolist()] + ["end"]
    return _labelled_columns(pic, steps + 2, names, [""] * len(za), len(za), title, path)


@torch.no_grad()
def layers_grid(vae, path, tops: int = 8, draws: int = 8) -> Path:
    """A stack's samples, one row per draw of the top layer z_L ~ p(z_L), the lower layers drawn
    afresh from the model in each column: what the top layer fixes and what the lower ones vary."""
    top = vae.prior().sample((tops,))  # (tops, latents[-1])
    rows = top.repeat_interleave(draws, dim=0)  # each top draw `draws` times, row by row
    return image_grid(vae.sample(tops * draws, top=rows), path, nrow=draws,
                      title="each row: one z_top ~ p(z_top); columns: the lower layers drawn again given it")

