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


def test_the_fast_binarization_is_a_bernoulli_draw_of_every_grey_level(monkeypatch):
    """Exactly: a pixel of level g is 1 when the first random byte (the first base-256 digit of a
    uniform U) is below g, 0 when it is above, and on a tie the next digit decides the same way; so
    over the 256 first digits, g give 1 and one ties, and P(1) = (g + P(1)) / 256, whose solution is
    g/255 (checked by handing it each first digit in turn, and each second digit after a tie). And in
    distribution, for every level, over 4,000 draws each; the bytes themselves are uniform."""
    import pyrovae.data as data

    levels = torch.arange(256, dtype=torch.uint8)
    for second in (0, 77, 255):  # the digit after a tie; after a second tie, another digit
        ones = torch.zeros(256)
        for first in range(256):
            later = iter([second, second ^ 1])
            monkeypatch.setattr(data, "_random_bytes", lambda n, gen, d=first: torch.full((n,), d, dtype=torch.uint8))
            monkeypatch.setattr(torch, "randint", lambda low, high, size, **kw: torch.full(size, next(later),
                                                                                          dtype=torch.uint8))
            ones += data.binarize_fast(levels)
        monkeypatch.undo()
        settles = torch.where(levels == second, second ^ 1, second)  # the digit that settles the tie at level g
        assert torch.equal(ones, levels.float() + (settles < levels).float())  # g of the 256 below, and the tie
    x = data.binarize_fast(levels.repeat(4000, 1), torch.Generator().manual_seed(0))
    p = levels.double() / 255
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert ((x.double().mean(0) - p).abs() <= 5 * (p * (1 - p) / 4000).sqrt() + 1e-12).all()
    counts = torch.bincount(data._random_bytes(256 * 4000, torch.Generator().manual_seed(1)).long(), minlength=256)
    assert ((counts - 4000).abs() <= 5 * 4000 ** 0.5).all()  # every byte value, as often as the others


def test_batches_shuffle_cover_everything_and_redraw_each_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1) * 25
    g = torch.Generator().manual_seed(0)
    epoch1 = list(batches(images, 4, g, None))
    assert [b.shape[0] for b in epoch1] == [4, 4, 2]
    assert sorted(torch.cat(epoch1).flatten().tolist()) == sorted(images.flatten().tolist())
    grey = torch.full((1000, 1, 2, 2), 128, dtype=torch.uint8)
    a = torch.cat(list(batches(grey, 100, g)))
    b = torch.cat(list(batches(grey, 100, g)))
    assert not torch.equal(a, b)  # dynamic binarization: a fresh draw every epoch
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(torch.cat(list(batches(grey, 100, g1))), torch.cat(list(batches(grey, 100, g2))))


def _png(path, size=(8, 8), channels=3, value=None, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (channels, *size), generator=g, dtype=torch.uint8)
    if value is not None:
        img.fill_(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = img.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if channels == 1 else array).save(path)
    return img


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data._decode_folder.cache_clear()


def test_image_folder_labels_from_subfolders_and_caches(tmp_path, cache):
    a = _png(tmp_path / "faces" / "cats" / "0.png", seed=1)
    b = _png(tmp_path / "faces" / "dogs" / "1.png", seed=2)
    loaded = data.load_image_folder(tmp_path / "faces")
    assert loaded.images.shape == (2, 3, 8, 8) and loaded.images.dtype == torch.uint8
    assert torch.equal(loaded.images[0], a) and torch.equal(loaded.images[1], b)
    assert loaded.labels.tolist() == [0, 1]
    assert list((tmp_path / "cache" / "pyrovae" / "decoded").glob("*.pt"))
    data._decode_folder.cache_clear()
    again = data.load_image_folder(tmp_path / "faces")  # from the on-disk cache
    assert torch.equal(again.images, loaded.images)


def test_mixed_sizes_need_image_size(tmp_path, cache):
    _png(tmp_path / "f" / "a.png", size=(8, 8))
    _png(tmp_path / "f" / "b.png", size=(12, 10))
    with pytest.raises(DatasetNotFoundError, match=r"different sizes.*--image-size"):
        data.load_image_folder(tmp_path / "f")
    loaded = data.load_image_folder(tmp_path / "f", image_size=6)
    assert loaded.images.shape == (2, 3, 6, 6)


def test_grey_and_colour_images_mix_as_colour(tmp_path, cache):
    _png(tmp_path / "f" / "a.png", channels=1, value=200)
    _png(tmp_path / "f" / "b.png", channels=3)
    loaded = data.load_image_folder(tmp_path / "f")
    assert loaded.images.shape == (2, 3, 8, 8) and (loaded.images[0] == 200).all()


def test_empty_missing_and_unreadable_folders(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="holds no images"):
        data.load_image_folder(tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError, match="no image folder at"):
        data.load_image_folder(tmp_path / "nowhere")
    _png(tmp_path / "bad" / "good.png")
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetNotFoundError, match=r"could not read the image .*broken.png"):
        data.load_image_folder(tmp_path / "bad")


def test_folder_dataset_splits(tmp_path, cache):
    for i in range(20):
        _png(tmp_path / "all" / f"{i:02d}.png", seed=i)
    train = data.load_dataset(f"folder:{tmp_path / 'all'}", train=True)
    test = data.load_dataset(f"folder:{tmp_path / 'all'}", train=False)
    assert (len(train), len(test)) == (18, 2)
    joined = torch.cat([train.images, test.images]).flatten(1)
    assert len({tuple(r.tolist()) for r in joined}) == 20  # a partition, no image in both
    for split in ("train", "test"):
        _png(tmp_path / "split" / split / "x.png")
    assert len(data.load_dataset(f"folder:{tmp_path / 'split'}", train=False)) == 1


def test_fashion_mnist_missing_offline(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"FashionMNIST was not found in .*FashionMNIST/raw"):
        data.load_dataset("fashion_mnist", tmp_path, train=True, download=False)


def test_cifar10_image_folder_layout(mnist_root):
    folder = mnist_root / "cifar10" / "test"
    if not folder.is_dir():
        pytest.skip(f"no CIFAR-10 image folder at {folder}")
    test = data.load_dataset("cifar10", mnist_root, train=False, download=False)
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert sorted(test.labels.unique().tolist()) == list(range(10))
    assert (test.labels == 3).sum() == 1000


def test_real_mnist_loads_as_uint8_tensors(mnist_root):
    test = load_mnist(mnist_root, train=False, download=False)
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert test.labels.shape == (10000,) and test.labels[:3].tolist() == [7, 2, 1]
