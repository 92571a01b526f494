import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from pyrovae.data import MNIST_FILES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts from an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The MNIST data root from PYROVAE_DATA; tests that need it skip (with the reason) without it."""
    root = os.environ.get("PYROVAE_DATA")
    if not root:
        pytest.skip("PYROVAE_DATA is not set: point it at a folder holding MNIST/raw/ to run this test")
    raw = Path(root) / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    if missing:
        pytest.skip(f"MNIST files missing in {raw}: {', '.join(missing)}")
    return Path(root).resolve()


@pytest.fixture(scope="session")
def mnist_small(mnist_root):
    """A small deterministic slice of MNIST: (uint8 train images, binary test images, test labels)."""
    from pyrovae.data import binarize, load_mnist

    train = load_mnist(mnist_root, train=True, download=False)
    test = load_mnist(mnist_root, train=False, download=False)
    test_binary = binarize(test.images[:500], torch.Generator().manual_seed(0))
    return train.images[:2048], test_binary, test.labels[:500]


def binary_images(n=8, shape=(1, 28, 28), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *shape), 0.3), generator=g)


def run_smoke(script, mnist_root, *args, timeout=600):
    """Run ``experiments/<script> --smoke ARGS`` as a subprocess (data root ``mnist_root`` if given); its stdout."""
    env = {**os.environ, "PYROVAE_DATA": str(mnist_root)} if mnist_root is not None else None
    result = subprocess.run([sys.executable, f"experiments/{script}", "--smoke", *args], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
