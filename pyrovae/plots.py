"""Figures of a run. The only module that imports matplotlib (with the file-only Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["loss_curve", "image_grid", "manifold_grid", "latent_scatter", "curves", "coin_entropy", "surprise_curve",
           "gaussian_kl_asymmetry", "log_likelihood_estimates"]


def _tile(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (H', W', C) picture with a 1-pixel gap."""
    from torchvision.utils import make_grid

    return make_grid(images.detach().cpu().float(), nrow=nrow, padding=1, pad_value=1.0).permute(1, 2, 0)


def _save(fig, path: str | Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
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
    return _save(fig, path)


def image_grid(images: torch.Tensor, path, nrow: int, title: str = "") -> Path:
    pic = _tile(images, nrow).numpy()
    fig, ax = plt.subplots(figsize=(nrow * 0.5, pic.shape[0] / pic.shape[1] * nrow * 0.5 + 0.3))
    ax.imshow(pic.squeeze(-1) if pic.shape[-1] == 1 else pic, cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


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
    return _save(fig, path)


# --- information theory (experiments/information_theory.py, experiments/looking_back.py) -------


def coin_entropy(p, entropy_bits, path) -> Path:
    """H(p) of a coin in bits against P(heads) = p, with its maximum marked."""
    p, entropy_bits = torch.as_tensor(p).cpu(), torch.as_tensor(entropy_bits).cpu()
    best = int(entropy_bits.argmax())
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(p, entropy_bits)
    ax.plot([p[best]], [entropy_bits[best]], "o", color="C3")
    ax.annotate(f"H({p[best]:.2f}) = {entropy_bits[best]:.3f} bit", (p[best], entropy_bits[best]),
                textcoords="offset points", xytext=(8, -16))
    ax.set_xlabel("p = P(heads)")
    ax.set_ylabel("H(p) (bits)")
    ax.set_title("entropy of a coin: $-p\\,\\log_2 p - (1-p)\\,\\log_2(1-p)$", fontsize=9)
    ax.set_ylim(0, 1.1)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def surprise_curve(p, surprise_bits, marked: dict[str, tuple[float, float]], path) -> Path:
    """Surprise -log2 p against p, with labelled points ``{label: (p, bits)}``."""
    p, surprise_bits = torch.as_tensor(p).cpu(), torch.as_tensor(surprise_bits).cpu()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(p, surprise_bits)
    for label, (px, bits) in marked.items():
        ax.plot([px], [bits], "o", color="C3")
        ax.annotate(label, (px, bits), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("probability p")
    ax.set_ylabel("surprise $-\\log_2 p$ (bits)")
    ax.set_title("rare events are surprising; sure ones are not", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def gaussian_kl_asymmetry(grid, densities: dict[str, torch.Tensor], shifts, kl_shift: dict[str, torch.Tensor],
                          ratios, kl_ratio: dict[str, torch.Tensor], path) -> Path:
    """Three panels: two densities; KL both ways as one mean moves; KL both ways as one scale grows."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for label, density in densities.items():
        axes[0].plot(grid, density, label=label)
    axes[0].set_xlabel("x")
    axes[0].set_ylabel("density")
    axes[0].set_title("the two Gaussians (at shift 2)", fontsize=9)
    for label, values in kl_shift.items():
        axes[1].plot(shifts, values, label=label)
    axes[1].set_xlabel("shift m of q's mean")
    axes[1].set_ylabel("KL (nats)")
    axes[1].set_title("p = N(0, 1), q = N(m, 2$^2$)", fontsize=9)
    for label, values in kl_ratio.items():
        axes[2].plot(ratios, values, label=label)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("scale s of q")
    axes[2].set_ylabel("KL (nats)")
    axes[2].set_title("p = N(0, 1), q = N(0, s$^2$)", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def log_likelihood_estimates(counts, curves: dict[str, dict[str, torch.Tensor]], path, title: str = "",
                             reference: dict[str, float] | None = None, ylabel: str = "estimate (nats)",
                             zoom: list[str] | None = None) -> Path:
    """Estimates against the number of samples (log x-axis): a line and a band each.

    ``curves[label]`` holds ``center``, ``low`` and ``high`` tensors aligned with the first entries of
    ``counts``; each of ``reference`` is drawn as a horizontal dashed line. With ``zoom``, a second
    panel shows only those curves (and the references) on their own scale.
    """
    panels = [list(curves)] + ([zoom] if zoom else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    colors = {label: f"C{i}" for i, label in enumerate(curves)}
    for ax, labels in zip(axes[0], panels):
        for label in labels:
            curve = curves[label]
            n = len(curve["center"])
            ax.plot(counts[:n], curve["center"], "o-", color=colors[label], label=label, markersize=3)
            ax.fill_between(counts[:n], curve["low"], curve["high"], color=colors[label], alpha=0.25, linewidth=0)
        for j, (label, value) in enumerate((reference or {}).items()):
            ax.axhline(value, color=f"C{len(curves) + j}", linestyle="--", linewidth=1, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("samples S")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title(title, fontsize=9)
    if zoom:
        axes[0][1].set_title("zoomed in", fontsize=9)
        fig.tight_layout()
    return _save(fig, path)


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
    return _save(fig, path)
