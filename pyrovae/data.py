"""Datasets as tensors on the training device: where they are found, how they are binarized, batched.

The whole dataset is kept as one uint8 tensor on the device; each epoch it is shuffled by a
permutation and cut into batches there, and binarized per batch (no per-item transforms, no
DataLoader workers).

Data roots, in order: an explicit ``data_dir``, the ``PYROVAE_DATA`` environment variable, and the
user cache folder (``$XDG_CACHE_HOME/pyrovae`` or ``~/.cache/pyrovae``), where torchvision downloads
what is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

__all__ = [
    "DATASETS", "BINARIZATIONS", "DatasetNotFoundError", "ImageData",
    "data_root", "load_dataset", "binarize", "batches",
]

MNIST_FILES = [
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not on disk and could not be downloaded."""


@dataclass
class ImageData:
    """One split of an image dataset, on one device."""

    images: torch.Tensor  # (N, C, H, W) uint8 grey levels 0..255
    labels: torch.Tensor  # (N,) int64 class labels

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder datasets are read from (and downloaded into)."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("PYROVAE_DATA"):
        return Path(os.environ["PYROVAE_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pyrovae"


def _mnist(root: Path, train: bool, download: bool):
    from torchvision.datasets import MNIST

    try:
        return MNIST(root=str(root), train=train, download=False)
    except RuntimeError as e:
        if "not found" not in str(e).lower():
            raise DatasetNotFoundError(_unreadable(root, e)) from None
        if not download:
            raise DatasetNotFoundError(_missing_mnist_message(root, "downloading is switched off")) from None
    try:
        return MNIST(root=str(root), train=train, download=True)
    except (RuntimeError, ValueError, AssertionError) as e:
        if (root / "MNIST" / "raw").is_dir() and all((root / "MNIST" / "raw" / f).is_file() for f in MNIST_FILES):
            raise DatasetNotFoundError(_unreadable(root, e)) from None
        raise DatasetNotFoundError(_missing_mnist_message(root, f"the download failed: {e}")) from None
    except Exception as e:  # offline: URLError, timeouts, HTTP errors; all mean "not here"
        raise DatasetNotFoundError(_missing_mnist_message(root, f"the download failed: {e}")) from None


def _unreadable(root: Path, error: Exception) -> str:
    return (f"the MNIST files in {root / 'MNIST' / 'raw'} could not be read ({type(error).__name__}: {error}); "
            "they may be truncated or corrupt: delete them to download afresh, or point --data-dir / "
            "PYROVAE_DATA at a good copy")


def _missing_mnist_message(root: Path, why: str) -> str:
    folder = root / "MNIST" / "raw"
    return (
        f"MNIST was not found in {folder} and {why}.\n"
        f"Expected these uncompressed files there: {', '.join(MNIST_FILES)}.\n"
        "Point pyrovae at a folder that holds MNIST/raw/ with --data-dir DIR or the PYROVAE_DATA "
        "environment variable, or run once with internet access so torchvision can download it."
    )


def load_mnist(data_dir=None, *, train: bool, download: bool = True, device="cpu") -> ImageData:
    ds = _mnist(data_root(data_dir), train, download)
    images = ds.data.unsqueeze(1)  # (N, 1, 28, 28) uint8
    return ImageData(images.to(device), ds.targets.to(device))


#: Datasets by config name: a loader taking (data_dir, train=, download=, device=).
DATASETS = {"mnist": load_mnist}


def load_dataset(name: str, data_dir=None, *, train: bool, download: bool = True, device="cpu") -> ImageData:
    return DATASETS[name](data_dir, train=train, download=download, device=device)


# --- binarization --------------------------------------------------------------------------------
def binarize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel with probability = grey level / 255. Returns float 0/1."""
    probs = images.float().div_(255)
    return torch.bernoulli(probs, generator=generator)


#: Training binarizations: dynamic draws afresh every time an image is used, static draws once.
BINARIZATIONS = ("dynamic", "static")


def batches(data: torch.Tensor, batch_size: int, generator: torch.Generator,
            binarization: str = "dynamic") -> Iterator[torch.Tensor]:
    """One epoch of shuffled float batches, on ``data``'s device.

    ``data`` is uint8 grey levels for dynamic binarization, or already-binary floats for static.
    """
    perm = torch.randperm(data.shape[0], generator=generator, device=data.device)
    for start in range(0, data.shape[0], batch_size):
        batch = data[perm[start:start + batch_size]]
        yield binarize(batch, generator) if binarization == "dynamic" else batch
