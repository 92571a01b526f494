"""pyrovae: variational autoencoders (Kingma and Welling 2014) as Pyro programs.

    from pyrovae import Config, build_vae
    vae = build_vae(Config().model)          # vae.model and vae.guide are Pyro programs
    run = pyrovae.train_run(Config(), "runs/mnist")      # run.vae, run.metrics
    vae = pyrovae.load("runs/mnist")         # the trained VAE again, with vae.config

The names below are imported when first used (PEP 562), so ``import pyrovae`` and the command line
start without loading torch and Pyro until they are needed.
"""

import importlib
import importlib.util

#: Each public name and the module that defines it.
_PUBLIC = {
    "Config": "pyrovae.config", "ModelConfig": "pyrovae.config", "DataConfig": "pyrovae.config",
    "TrainConfig": "pyrovae.config", "VAE": "pyrovae.model", "build_vae": "pyrovae.build",
    "PyroELBO": "pyrovae.objectives", "train_step": "pyrovae.engine", "fit": "pyrovae.engine",
    "TrainState": "pyrovae.state", "load": "pyrovae.checkpoint", "train_run": "pyrovae.runs",
}

__all__ = ["Config", "ModelConfig", "DataConfig", "TrainConfig", "VAE", "build_vae", "PyroELBO", "train_step", "fit",
           "TrainState", "load", "train_run"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """A public name, or a submodule (``pyrovae.runs``), imported on first use."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
