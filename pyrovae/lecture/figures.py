"""The lecture's figures: information theory (surprise, entropy, the asymmetry of KL) and why the
encoder makes log p(x) tractable. Drawn by the studies in ``experiments/studies/``."""

from __future__ import annotations

from pathlib import Path

import torch

from pyrovae.plots import plt, save  # matplotlib with the file-only backend

__all__ = ["coin_entropy", "surprise_curve", "gaussian_kl_asymmetry", "log_likelihood_estimates"]


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
    return save(fig, path)


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
    return save(fig, path)


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
    return save(fig, path)


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
    return save(fig, path)
