"""pyrovae: variational autoencoders (Kingma and Welling 2014) as Pyro programs.

    from pyrovae import Config, build_vae
    vae = build_vae(Config().model)          # vae.model and vae.guide are Pyro programs
    run = pyrovae.train_run(Config(), "runs/mnist")      # run.vae, run.metrics
    vae = pyrovae.load("runs/mnist")         # the trained VAE again, with vae.config
"""

from pyrovae.config import Config, DataConfig, ModelConfig, TrainConfig
from pyrovae.model import VAE, build_vae
from pyrovae.engine import TrainState, fit, train_step
from pyrovae.objectives import PyroELBO
from pyrovae.checkpoint import load
from pyrovae.runs import train_run

__all__ = ["Config", "ModelConfig", "DataConfig", "TrainConfig", "VAE", "build_vae", "PyroELBO", "train_step", "fit",
           "TrainState", "load", "train_run"]
__version__ = "0.1.0"
