"""Watch a run live in TensorBoard (optional: ``pip install 'pyrovae[tensorboard]'``).

With ``train.tensorboard = true`` (``--tensorboard``) a run writes event files into
``<run>/tensorboard``; ``tensorboard --logdir runs`` then shows, as the run goes:

- ``train/neg_elbo_step``: the training -ELBO per image of the step read back every
  ``train.log_every_steps`` steps (the read the loop makes anyway), with the learning rate and the
  KL weight;
- per epoch: the training and test -ELBO, the test reconstruction and KL terms (nats per image, and
  bits/dim for 8-bit likelihoods), and grids of test reconstructions and of samples from the prior.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["Board", "tensorboard_available", "require_tensorboard"]


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def require_tensorboard() -> None:
    """Raise a config error unless the tensorboard package is installed: checked where a run is about
    to log, not in the config, so that a run trained with ``train.tensorboard`` loads, evaluates and
    samples wherever it is copied, tensorboard or not."""
    from pyrovae.options import ConfigError

    if not tensorboard_available():
        raise ConfigError("train.tensorboard needs the tensorboard package: pip install 'pyrovae[tensorboard]' "
                          "(or pip install tensorboard), or leave train.tensorboard off")


class Board:
    """Writes one run's scalars and image grids as TensorBoard events."""

    def __init__(self, folder, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # a run resumed at step s drops the events logged after s (after its checkpoint), so the curves
        # do not fold back
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

    def step(self, step: int, loss: torch.Tensor, images: int, lr: float, kl_weight: float) -> None:
        self.writer.add_scalar("train/neg_elbo_step", float(loss) / images, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/kl_weight", kl_weight, step)

    @torch.no_grad()
    def epoch(self, row: dict, vae, test: torch.Tensor, seed: int) -> None:
        from torchvision.utils import make_grid

        from pyrovae.evaluate import seeded_noise

        step = row["steps"]
        for key in ("train_neg_elbo", "test_neg_elbo", "test_reconstruction", "test_kl", "test_bits_per_dim"):
            if key in row:
                self.writer.add_scalar(f"epoch/{key}", row[key], step)
        vae.eval()
        inputs = test[torch.linspace(0, len(test) - 1, min(8, len(test))).long().to(test.device)]
        pairs = torch.cat([inputs, vae.reconstruct(inputs)]).clamp(0, 1).cpu()
        self.writer.add_image("reconstructions", make_grid(pairs, nrow=len(inputs)), step)
        with seeded_noise(seed, test.device):
            samples = vae.sample(16).clamp(0, 1).cpu()
        self.writer.add_image("samples", make_grid(samples, nrow=8), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
