"""Helpers shared by the tests: small synthetic data, and running an experiment script's smoke test."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from pyrovae.data import Prepared, binarize

ROOT = Path(__file__).resolve().parents[1]


def binary_images(n=8, shape=(1, 28, 28), seed=0):
    """n images of 0/1 pixels, each pixel 1 with probability 0.3."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *shape), 0.3), generator=g)


def grey_images(n=8, shape=(1, 28, 28), seed=0):
    """n uint8 images of random grey levels, brighter in the middle (so a VAE has something to learn)."""
    g = torch.Generator().manual_seed(seed)
    h, w = shape[-2:]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    centre = (1 - (xs**2 + ys**2)).clamp(0, 1)  # (H, W)
    levels = torch.rand((n, *shape), generator=g) * 0.5 + centre * 0.5
    return (levels * 255).round().to(torch.uint8)


def synthetic_data(n_train=600, n_test=100, shape=(1, 28, 28), seed=0) -> Prepared:
    """A binary dataset prepared as for the Bernoulli likelihood: uint8 training images binarized per
    batch (dynamically), test images binarized once."""
    train = grey_images(n_train, shape, seed)
    test = binarize(grey_images(n_test, shape, seed + 1), torch.Generator().manual_seed(0))
    return Prepared(train, binarize, test, torch.arange(n_test) % 10, "binary")


def run_smoke(script, data_root, *args, timeout=600):
    """Run ``experiments/<script> --smoke ARGS`` as a subprocess (data root ``data_root`` if given); its stdout."""
    env = {**os.environ, "PYROVAE_DATA": str(data_root)} if data_root is not None else None
    result = subprocess.run([sys.executable, f"experiments/{script}", "--smoke", *args], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def image_folder(root: Path, n_train=600, n_test=100, shape=(1, 28, 28), seed=0) -> Path:
    """A folder dataset in the ``folder:PATH`` layout (root/train/<class>/*.png and root/test/...), of
    synthetic grey images; returns ``root``."""
    from PIL import Image

    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images = grey_images(n, shape, s)
        for i, img in enumerate(images):
            folder = root / split / f"class{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            array = img.permute(1, 2, 0).squeeze(-1).numpy() if shape[0] == 1 else img.permute(1, 2, 0).numpy()
            Image.fromarray(array).save(folder / f"{i:05d}.png")
    return root
