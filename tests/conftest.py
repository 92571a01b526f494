import os
from pathlib import Path

import pyro
import pytest
import torch

from pyrovae.data import MNIST_FILES

#: Why a test that needs CUDA does not run here.
NO_CUDA = "no CUDA device: torch.cuda.is_available() is False on this machine; this case runs where a GPU is present"


def _devices() -> list:
    """The devices a test that takes ``device`` runs on: the CPU, and CUDA. The CUDA cases carry the
    ``cuda`` marker, so ``pytest -m cuda`` selects exactly them; where there is no GPU they are
    listed as skipped, with the reason (see ``pytest_collection_modifyitems``)."""
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=_devices())
def device(request) -> torch.device:
    """Each device, in turn: the CPU always, CUDA where a GPU is present (skipped elsewhere)."""
    return torch.device(request.param)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, saying why, where there is no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts from an empty param store, a fixed seed and Pyro's validation on (as stock
    Pyro users have it; the training loop turns it off after checking its data once)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Decoded image folders are cached under $XDG_CACHE_HOME: keep the tests' out of the user's cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


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
