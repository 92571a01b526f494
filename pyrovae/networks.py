"""Plain PyTorch networks: the encoder and decoder of a VAE.

No Pyro here. The encoder maps an image to the parameters of q(z|x); the decoder maps a code z to
the raw outputs that a likelihood turns into a distribution over images.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ACTIVATIONS", "NETWORKS", "MLPEncoder", "MLPDecoder", "build_mlp", "network_for"]

#: Hidden-layer nonlinearities, by config name.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "softplus": nn.Softplus,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers with `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """x -> (loc, scale) of a diagonal Gaussian over z.

    The scale is ``softplus(raw) + min_scale``: positive, smooth, and bounded away from zero so the
    ELBO cannot be driven to infinity by a collapsing posterior.
    """

    def __init__(
        self,
        image_shape: tuple[int, ...],
        z_dim: int,
        hidden: tuple[int, ...],
        activation: str = "softplus",
        min_scale: float = 1e-4,
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.z_dim = z_dim
        self.min_scale = min_scale
        x_dim = math.prod(self.image_shape)
        self.body = _mlp([x_dim, *hidden], activation)
        self.act = ACTIVATIONS[activation]() if hidden else nn.Identity()
        self.head = nn.Linear(hidden[-1] if hidden else x_dim, 2 * z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.act(self.body(x.flatten(-len(self.image_shape))))  # (batch, hidden[-1])
        loc, raw_scale = self.head(h).chunk(2, dim=-1)  # (batch, z_dim) each
        return loc, F.softplus(raw_scale) + self.min_scale


class MLPDecoder(nn.Module):
    """z -> (batch, *image_shape) raw outputs (for example Bernoulli logits), one per pixel."""

    def __init__(
        self,
        z_dim: int,
        image_shape: tuple[int, ...],
        hidden: tuple[int, ...],
        activation: str = "softplus",
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.net = _mlp([z_dim, *hidden, math.prod(self.image_shape)], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.net(z)  # (batch, prod(image_shape))
        return out.unflatten(-1, self.image_shape)  # (batch, *image_shape)


def build_mlp(image_shape: tuple[int, ...], z_dim: int, out_channels: int, *, hidden: tuple[int, ...],
              activation: str = "softplus", min_scale: float = 1e-4) -> tuple[nn.Module, nn.Module]:
    """Encoder x -> (loc, scale) and decoder z -> (batch, out_channels, H, W), mirrored MLPs."""
    encoder = MLPEncoder(image_shape, z_dim, hidden, activation, min_scale)
    decoder = MLPDecoder(z_dim, (out_channels, *image_shape[1:]), tuple(reversed(hidden)), activation)
    return encoder, decoder


#: Encoder/decoder pairs by config name: a builder taking (image_shape, z_dim, out_channels, **options).
NETWORKS = {
    "mlp": build_mlp,
}


def network_for(image_shape: tuple[int, ...]) -> str:
    """The network ``network = "auto"`` picks: convolutional for colour images when available, else MLP."""
    return "conv" if image_shape[0] == 3 and "conv" in NETWORKS else "mlp"
