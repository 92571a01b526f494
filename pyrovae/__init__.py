"""pyrovae: variational autoencoders (Kingma and Welling 2014) as Pyro programs.

    from pyrovae import Config, build_vae
    vae = build_vae(Config().model)          # vae.model and vae.guide are Pyro programs
"""

from pyrovae.config import Config, DataConfig, ModelConfig, TrainConfig
from pyrovae.model import VAE, build_vae
from pyrovae.engine import TrainState, fit, train_step
from pyrovae.objectives import PyroELBO

__all__ = ["Config", "ModelConfig", "DataConfig", "TrainConfig", "VAE", "build_vae", "PyroELBO", "train_step", "fit",
           "TrainState"]
__version__ = "0.1.0"
