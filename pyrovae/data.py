"""Datasets as tensors on the training device: where they are found, how they become model inputs.

Every dataset is loaded as one uint8 tensor (N, C, H, W) of grey levels; each epoch it is shuffled by
a permutation and cut into batches on the device, and each batch is turned into what the likelihood
models (no per-item transforms, no DataLoader workers):

- ``binary`` likelihoods (Bernoulli) get 0/1 pixels: drawn afresh per batch (dynamic binarization)
  or drawn once (static);
- ``unit`` and ``8bit`` likelihoods get ``grey / 255``: floats in [0, 1], exact multiples of 1/255.

Data roots, in order: an explicit ``data_dir``, the ``PYROVAE_DATA`` environment variable, and the
user cache folder (``$XDG_CACHE_HOME/pyrovae`` or ``~/.cache/pyrovae``), where torchvision downloads
what is missing.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

__all__ = [
    "DATASETS", "BINARIZATIONS", "DatasetNotFoundError", "ImageData", "MNIST_FILES",
    "data_root", "load_dataset", "load_mnist", "load_image_folder", "binarize", "to_unit", "batches",
    "dataset_is_known", "Prepared", "prepare_data", "prepare_train", "prepare_test",
]

MNIST_FILES = [
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is missing, empty or unreadable, and could not be downloaded."""


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
    return _cache_dir()


def _cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pyrovae"


# --- MNIST and Fashion-MNIST (torchvision's idx layout) -------------------------------------------
def _idx_dataset(cls_name: str, root: Path, train: bool, download: bool):
    import torchvision.datasets

    cls = getattr(torchvision.datasets, cls_name)
    raw = root / cls_name / "raw"
    try:
        return cls(root=str(root), train=train, download=False)
    except RuntimeError as e:
        if "not found" not in str(e).lower():
            raise DatasetNotFoundError(_unreadable(raw, e)) from None
        if not download:
            raise DatasetNotFoundError(_missing_idx_message(cls_name, raw, "downloading is switched off")) from None
    try:
        return cls(root=str(root), train=train, download=True)
    except (RuntimeError, ValueError, AssertionError) as e:
        if raw.is_dir() and all((raw / f).is_file() for f in MNIST_FILES):
            raise DatasetNotFoundError(_unreadable(raw, e)) from None
        raise DatasetNotFoundError(_missing_idx_message(cls_name, raw, f"the download failed: {e}")) from None
    except Exception as e:  # offline: URLError, timeouts, HTTP errors; all mean "not here"
        raise DatasetNotFoundError(_missing_idx_message(cls_name, raw, f"the download failed: {e}")) from None


def _unreadable(folder: Path, error: Exception) -> str:
    return (f"the files in {folder} could not be read ({type(error).__name__}: {error}); they may be "
            "truncated or corrupt: delete them to download afresh, or point --data-dir / PYROVAE_DATA at a "
            "good copy")


def _missing_idx_message(cls_name: str, folder: Path, why: str) -> str:
    return (
        f"{cls_name} was not found in {folder} and {why}.\n"
        f"Expected these uncompressed files there: {', '.join(MNIST_FILES)}.\n"
        f"Point pyrovae at a folder that holds {cls_name}/raw/ with --data-dir DIR or the PYROVAE_DATA "
        "environment variable, or run once with internet access so torchvision can download it."
    )


def load_mnist(data_dir=None, *, train: bool, download: bool = True, device="cpu", **_) -> ImageData:
    ds = _idx_dataset("MNIST", data_root(data_dir), train, download)
    return ImageData(ds.data.unsqueeze(1).to(device), ds.targets.to(device))  # (N, 1, 28, 28)


def load_fashion_mnist(data_dir=None, *, train: bool, download: bool = True, device="cpu", **_) -> ImageData:
    ds = _idx_dataset("FashionMNIST", data_root(data_dir), train, download)
    return ImageData(ds.data.unsqueeze(1).to(device), ds.targets.to(device))


# --- CIFAR-10 -------------------------------------------------------------------------------------
def load_cifar10(data_dir=None, *, train: bool, download: bool = True, device="cpu", image_size=None,
                 **_) -> ImageData:
    """CIFAR-10 from ``ROOT/cifar10/{train,test}/<class>/*`` (an image folder) or torchvision's release."""
    root = data_root(data_dir)
    folder = root / "cifar10" / ("train" if train else "test")
    if folder.is_dir():
        return load_image_folder(folder, image_size=image_size, device=device)
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root=str(root), train=train, download=download)
    except Exception as e:
        why = "downloading is switched off" if not download else f"the download failed or the files are unreadable: {e}"
        raise DatasetNotFoundError(
            f"CIFAR-10 was not found under {root} and {why}.\nExpected either an image folder "
            f"{root / 'cifar10' / 'train'}/<class>/*.png|jpg (and test/), or torchvision's "
            f"{root / 'cifar-10-batches-py'}. Point --data-dir / PYROVAE_DATA at a copy, or run once online."
        ) from None
    images = torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return ImageData(images.to(device), torch.as_tensor(ds.targets).to(device))


# --- any folder of images -------------------------------------------------------------------------
def load_image_folder(folder, *, image_size: int | None = None, device="cpu") -> ImageData:
    """Every image under ``folder`` (recursively) as one tensor; labels from the first-level subfolders.

    Images of different sizes need ``image_size``: each is resized (shorter side) and centre-cropped to
    a square. Decoded tensors are cached under the user cache folder, keyed by the files' names,
    sizes and times, so a second load is fast.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetNotFoundError(f"no image folder at {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetNotFoundError(f"{folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}, "
                                   "in subfolders too)")
    return _decode_folder(folder, tuple(files), image_size, _fingerprint(files, image_size)).to_device(device)


def _fingerprint(files, image_size) -> str:
    h = hashlib.sha1(repr(image_size).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@dataclass
class _Decoded(ImageData):
    def to_device(self, device) -> ImageData:
        return ImageData(self.images.to(device), self.labels.to(device))


@functools.lru_cache(maxsize=4)
def _decode_folder(folder: Path, files: tuple[Path, ...], image_size, fingerprint: str) -> _Decoded:
    cache = _cache_dir() / "decoded" / f"{fingerprint}.pt"
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            return _Decoded(saved["images"], saved["labels"])
        except Exception:
            cache.unlink(missing_ok=True)  # a bad cache is rebuilt
    decoded = [_read_image(f) for f in files]
    colour = any(img.shape[0] >= 3 for img in decoded)
    decoded = [_channels(img, 3 if colour else 1) for img in decoded]
    if image_size is not None:
        decoded = [_square(img, image_size) for img in decoded]
    sizes = {tuple(img.shape[1:]) for img in decoded}
    if len(sizes) > 1:
        a, b = sorted(sizes)[:2]
        raise DatasetNotFoundError(f"the images in {folder} have different sizes (e.g. {a[0]}x{a[1]} and "
                                   f"{b[0]}x{b[1]}); pass --image-size N to resize and crop them all to NxN")
    classes = sorted({f.relative_to(folder).parts[0] for f in files if len(f.relative_to(folder).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index.get(f.relative_to(folder).parts[0], 0) for f in files], dtype=torch.int64)
    result = _Decoded(torch.stack(decoded), labels)
    try:
        from pyrovae.atomic import atomic_write

        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda fh: torch.save({"images": result.images, "labels": result.labels}, fh))
    except OSError:
        pass  # no cache when the cache folder is not writable
    return result


def _read_image(path: Path) -> torch.Tensor:
    """(C, H, W) uint8 from any image file Pillow reads; C is 1 (grey) or 3 (colour), alpha dropped."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
            array = np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DatasetNotFoundError(f"could not read the image {path}: {e}; remove or replace it") from None
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def _channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    if img.shape[0] == channels:
        return img
    if channels == 3:
        return img.expand(3, -1, -1)
    return img.float().mean(0, keepdim=True).round().to(torch.uint8)


def _square(img: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    return F.center_crop(F.resize(img, size, antialias=True), [size, size])


def load_folder_dataset(spec: str, data_dir=None, *, train: bool, download: bool = True, device="cpu",
                        image_size=None) -> ImageData:
    """``folder:PATH``: PATH/train and PATH/test when both exist, else a fixed 90/10 split of PATH."""
    path = Path(spec.split(":", 1)[1]).expanduser()
    if (path / "train").is_dir() and (path / "test").is_dir():
        return load_image_folder(path / ("train" if train else "test"), image_size=image_size, device=device)
    everything = load_image_folder(path, image_size=image_size, device="cpu")
    n = len(everything)
    if n < 2:
        raise DatasetNotFoundError(f"{path} holds {n} image; a folder dataset needs at least 2 (train and test)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_test = max(1, n // 10)
    pick = order[n_test:] if train else order[:n_test]
    return ImageData(everything.images[pick].to(device), everything.labels[pick].to(device))


#: Datasets by config name: a loader taking (data_dir, train=, download=, device=, image_size=).
#: ``folder:PATH`` names any folder of images.
DATASETS = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10}


def dataset_is_known(name: str) -> bool:
    return name in DATASETS or (name.startswith("folder:") and len(name) > len("folder:"))


def load_dataset(name: str, data_dir=None, *, train: bool, download: bool = True, device="cpu",
                 image_size: int | None = None) -> ImageData:
    loader = load_folder_dataset if name.startswith("folder:") else DATASETS[name]
    if loader is load_folder_dataset:
        return loader(name, data_dir, train=train, download=download, device=device, image_size=image_size)
    data = loader(data_dir, train=train, download=download, device=device, image_size=image_size)
    if image_size is not None and data.image_shape[1:] != (image_size, image_size):
        data = ImageData(torch.stack([_square(img, image_size) for img in data.images.cpu()]).to(device),
                         data.labels)
    return data


# --- from grey levels to model inputs ------------------------------------------------------------
def binarize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel with probability = grey level / 255. Returns float 0/1."""
    probs = images.float().div_(255)
    return torch.bernoulli(probs, generator=generator)


def to_unit(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Grey levels as floats in [0, 1] (exact multiples of 1/255)."""
    return images.float().div_(255)


#: Training binarizations: dynamic draws afresh every time an image is used, static draws once.
BINARIZATIONS = ("dynamic", "static")


def batches(data: torch.Tensor, batch_size: int, generator: torch.Generator,
            per_batch=binarize) -> Iterator[torch.Tensor]:
    """One epoch of shuffled batches of ``data`` on its device, each passed through ``per_batch``.

    ``per_batch(batch, generator)``: :func:`binarize` (dynamic binarization), :func:`to_unit`, or
    None for data that is ready as it is (e.g. statically binarized).
    """
    perm = torch.randperm(data.shape[0], generator=generator, device=data.device)
    for start in range(0, data.shape[0], batch_size):
        batch = data[perm[start:start + batch_size]]
        yield per_batch(batch, generator) if per_batch is not None else batch


# --- a dataset made ready for a model ------------------------------------------------------------
class Prepared(NamedTuple):
    """What the training loop and the evaluation read: the data as the configured likelihood models it."""

    train: torch.Tensor  # (N, C, H, W) on the device: uint8 grey levels, or floats when prepared once
    per_batch: Callable | None  # turns a training batch into model inputs (binarize, to_unit) or None
    test: torch.Tensor  # (M, C, H, W) float model inputs on the device, fixed for every run
    test_labels: torch.Tensor  # (M,) on the CPU
    kind: str  # what the likelihood models: binary, unit or 8bit


def _data_kind(config) -> str:
    from pyrovae.likelihoods import LIKELIHOODS

    return LIKELIHOODS[config.model.likelihood].data_kind


def prepare_train(config, device: torch.device, download: bool = True) -> tuple[torch.Tensor, Callable | None]:
    """The training images on the device, and what turns a batch of them into model inputs.

    Binary likelihoods: binarized dynamically (a fresh draw per batch) or statically (once, from the
    run's seed). Other likelihoods: grey levels / 255, per batch.
    """
    d, t = config.data, config.train
    images = load_dataset(d.dataset, d.data_dir, train=True, download=download, device=device,
                          image_size=d.image_size).images
    images = images[: t.train_subset] if t.train_subset else images
    if _data_kind(config) != "binary":
        return images, to_unit
    if d.binarization == "static":
        return binarize(images.cpu(), torch.Generator().manual_seed(t.seed)).to(device), None
    return images, binarize


def prepare_test(config, device: torch.device, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The test inputs on the device and their labels on the CPU; the training split is not read.

    Binary likelihoods: binarized once from ``data.test_binarization_seed``, on the CPU, so the test set
    is the same for every run and device. Other likelihoods: grey levels / 255.
    """
    d, t = config.data, config.train
    test = load_dataset(d.dataset, d.data_dir, train=False, download=download, device="cpu",
                        image_size=d.image_size)
    images, labels = test.images, test.labels
    if t.test_subset:
        images, labels = images[: t.test_subset], labels[: t.test_subset]
    if _data_kind(config) != "binary":
        return to_unit(images).to(device), labels
    return binarize(images, torch.Generator().manual_seed(d.test_binarization_seed)).to(device), labels


def prepare_data(config, device: torch.device, download: bool = True) -> Prepared:
    """Load the configured dataset, both splits, as what the configured likelihood models."""
    train, per_batch = prepare_train(config, device, download)
    test, labels = prepare_test(config, device, download)
    return Prepared(train, per_batch, test, labels, _data_kind(config))
