import os
from pathlib import Path

import pyro
import pytest

from pyrovae.data import MNIST_FILES


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
