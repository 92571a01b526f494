"""Plain PyTorch networks: the encoder and decoder of a VAE.

No Pyro here. The encoder maps an image to the parameters of q(z|x); the decoder maps a code z to
the raw outputs that a likelihood turns into a distribution over images.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ACTIVATIONS", "NETWORKS", "MLPEncoder", "MLPDecoder", "ConvEncoder", "ConvDecoder", "build_mlp",
    "build_conv", "network_for",
]

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


def _halvings(size: int, times: int) -> list[int]:
    """Spatial sizes after each stride-2 convolution (kernel 4, padding 1): size, size // 2, ..."""
    sizes = [size]
    for _ in range(times):
        sizes.append(sizes[-1] // 2)
    return sizes


class ConvEncoder(nn.Module):
    """x -> (loc, scale): stride-2 convolutions, then fully connected layers.

    Each convolution (kernel 4, stride 2, padding 1) halves height and width (rounding down):
    28 -> 14 -> 7 and 32 -> 16 -> 8 with two of them. The scale is ``softplus(raw) + min_scale``,
    as in :class:`MLPEncoder`.
    """

    def __init__(self, image_shape: tuple[int, ...], z_dim: int, channels: tuple[int, ...],
                 hidden: tuple[int, ...], activation: str = "softplus", min_scale: float = 1e-4):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.min_scale = min_scale
        c, h, w = self.image_shape
        if min(h, w) < 2 ** len(channels):
            raise ValueError(f"{len(channels)} stride-2 convolutions need images of at least "
                             f"{2 ** len(channels)} pixels a side, got {h}x{w}; use fewer channels entries")
        layers: list[nn.Module] = []
        for n_in, n_out in zip((c, *channels[:-1]), channels):
            layers += [nn.Conv2d(n_in, n_out, kernel_size=4, stride=2, padding=1), ACTIVATIONS[activation]()]
        self.convs = nn.Sequential(*layers)
        flat = channels[-1] * _halvings(h, len(channels))[-1] * _halvings(w, len(channels))[-1]
        self.dense = nn.Sequential(_mlp([flat, *hidden], activation), ACTIVATIONS[activation]())
        self.head = nn.Linear(hidden[-1], 2 * z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[:-3]  # any leading batch dims (e.g. particles, batch)
        h = self.dense(self.convs(x.reshape(-1, *x.shape[-3:])).flatten(1)).unflatten(0, batch)  # (..., hidden[-1])
        loc, raw_scale = self.head(h).chunk(2, dim=-1)  # (batch, z_dim) each
        return loc, F.softplus(raw_scale) + self.min_scale


class ConvDecoder(nn.Module):
    """z -> (batch, out_channels, H, W): the mirror of :class:`ConvEncoder` with transposed convolutions.

    Each transposed convolution doubles height and width, plus one row or column where the encoder
    rounded an odd size down, so the output has exactly the image's H and W.
    """

    def __init__(self, z_dim: int, out_shape: tuple[int, ...], channels: tuple[int, ...],
                 hidden: tuple[int, ...], activation: str = "softplus"):
        super().__init__()
        out_channels, h, w = out_shape
        heights, widths = _halvings(h, len(channels)), _halvings(w, len(channels))
        self.start = (channels[-1], heights[-1], widths[-1])
        self.dense = nn.Sequential(_mlp([z_dim, *hidden, math.prod(self.start)], activation),
                                   ACTIVATIONS[activation]())
        layers: list[nn.Module] = []
        ins = tuple(reversed(channels))
        outs = (*ins[1:], out_channels)
        for i, (n_in, n_out) in enumerate(zip(ins, outs)):
            level = len(channels) - 1 - i  # sizes go heights[level + 1] -> heights[level]
            extra = (heights[level] - 2 * heights[level + 1], widths[level] - 2 * widths[level + 1])
            layers.append(nn.ConvTranspose2d(n_in, n_out, kernel_size=4, stride=2, padding=1, output_padding=extra))
            if i < len(channels) - 1:
                layers.append(ACTIVATIONS[activation]())
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]  # any leading batch dims (e.g. particles, batch)
        h = self.dense(z.reshape(-1, z.shape[-1])).unflatten(-1, self.start)  # (n, channels[-1], H/2^L, W/2^L)
        out = self.deconvs(h)  # (n, out_channels, H, W)
        return out.unflatten(0, batch)  # (..., out_channels, H, W)


def build_conv(image_shape: tuple[int, ...], z_dim: int, out_channels: int, *, hidden: tuple[int, ...],
               activation: str = "softplus", min_scale: float = 1e-4,
               channels: tuple[int, ...] = (32, 64)) -> tuple[nn.Module, nn.Module]:
    """Convolutional encoder x -> (loc, scale) and its mirror, decoder z -> (batch, out_channels, H, W).

    ``channels`` are the widths of the stride-2 convolutions, one halving of H and W each; ``hidden``
    the fully connected layers between them and z.
    """
    channels = tuple(channels)
    if not channels or any(not isinstance(n, int) or n < 1 for n in channels):
        raise ValueError(f"channels must be one or more positive widths, e.g. (32, 64); got {channels!r}")
    encoder = ConvEncoder(image_shape, z_dim, channels, hidden, activation, min_scale)
    decoder = ConvDecoder(z_dim, (out_channels, *image_shape[1:]), channels, tuple(reversed(hidden)), activation)
    return encoder, decoder


#: Encoder/decoder pairs by config name: a builder taking (image_shape, z_dim, out_channels, **options).
NETWORKS = {
    "mlp": build_mlp,
    "conv": build_conv,
}


def network_for(image_shape: tuple[int, ...]) -> str:
    """The network ``network = "auto"`` picks: convolutional for colour images when available, else MLP."""
    return "conv" if image_shape[0] == 3 and "conv" in NETWORKS else "mlp"
