from urllib.error import URLError

import pytest
import torch

from pyrovae import data
from pyrovae.data import DatasetNotFoundError, batches, binarize, data_root, load_mnist


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "flag") == tmp_path / "flag"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("PYROVAE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "cache" / "pyrovae"


def test_missing_mnist_without_download_names_folder_and_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist(tmp_path, train=True, download=False)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "--data-dir" in message and "PYROVAE_DATA" in message


def test_missing_mnist_offline_gives_one_clear_error(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(MNIST, "download", offline)
    with pytest.raises(DatasetNotFoundError, match="the download failed"):
        load_mnist(tmp_path, train=False)


def test_binarize_is_a_bernoulli_draw_of_the_grey_level():
    grey = torch.full((20000,), 64, dtype=torch.uint8)
    x = binarize(grey, torch.Generator().manual_seed(0))
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    p = 64 / 255
    assert abs(x.mean().item() - p) < 4 * (p * (1 - p) / 20000) ** 0.5
    assert torch.equal(binarize(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([0.0, 1.0]))


def test_batches_shuffle_cover_everything_and_redraw_each_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1) * 25
    g = torch.Generator().manual_seed(0)
    epoch1 = list(batches(images, 4, g, "static"))
    assert [b.shape[0] for b in epoch1] == [4, 4, 2]
    assert sorted(torch.cat(epoch1).flatten().tolist()) == sorted(images.flatten().tolist())
    grey = torch.full((1000, 1, 2, 2), 128, dtype=torch.uint8)
    a = torch.cat(list(batches(grey, 100, g)))
    b = torch.cat(list(batches(grey, 100, g)))
    assert not torch.equal(a, b)  # dynamic binarization: a fresh draw every epoch
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(torch.cat(list(batches(grey, 100, g1))), torch.cat(list(batches(grey, 100, g2))))


def test_registry_names_every_dataset():
    assert set(data.DATASETS) == {"mnist"}


def test_real_mnist_loads_as_uint8_tensors(mnist_root):
    test = load_mnist(mnist_root, train=False, download=False)
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert test.labels.shape == (10000,) and test.labels[:3].tolist() == [7, 2, 1]
