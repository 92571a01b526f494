"""The stack of stochastic layers on the residual network: latents at several resolutions.

The lowest layer z_1 is the residual network's spatial latent (``network_options.latent_channels``
channels at the encoder's coarsest level, for example 16 x 16); each layer above it halves the
height and width, so ``model.latents = [4096, 1024, 256]`` with 16 channels at 16 x 16 stacks
16 x 8 x 8 and 16 x 4 x 4 above it. Each layer is a flat vector of ``size`` numbers, channel-major,
as the one-layer residual VAE's latent is, so the stack's Pyro programs
(:class:`pyrovae.hierarchy.HierarchicalVAE`) are the MLP stack's, unchanged.

Networks, all residual:

- generative, top-down: p(z_l | z_{l+1}) upsamples z_{l+1} to the finer grid, a 3x3 convolution
  and a residual block give each position's Gaussian; p(x | z_1) is the residual decoder;
- inference, top-down only (``top_down`` or ``top_down_residual``, see :mod:`pyrovae.hierarchy`): the residual encoder's
  features at z_1's resolution give the data's estimate of z_1, and each layer above halves those
  features (a stride-2 unit and a residual block) for its own estimate. A global arrangement (the
  digit, the scene layout) can then sit in the coarse layers, the texture in the fine one;
- with ``model.decoder_skip``, the features p(z_1 | z_2) is computed from (width channels at z_1's
  grid) pass an activation and a 3x3 convolution and are added to the decoder's first convolution of
  z_1, so the coarse layers shape the image directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.config import ConfigError
from pyrovae.hierarchy import HierarchicalVAE, StackEncoder
from pyrovae.networks import ACTIVATIONS, ResidualBlock, _unit, _with_weight_norm, build_resnet, resnet_levels

__all__ = ["SpatialGaussianNet", "EncoderLayer", "build_resnet_stack"]


class EncoderLayer(nn.Module):
    """The residual encoder as the stack's first inference network: x -> (m_1, s_1, features)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e = self.encoder
        batch = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])
        if e.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = e.convs(x)  # (n, width, H_1, W_1)
        loc, raw_scale = (part.flatten(1).unflatten(0, batch) for part in e.head(features).chunk(2, dim=1))
        return loc, F.softplus(raw_scale).clamp(max=e.MAX_SCALE) + e.min_scale, features


class SpatialGaussianNet(nn.Module):
    """A grid at one resolution -> a diagonal Gaussian over a grid at the next, flat and channel-major.

    ``flat_input``: the input is a flat latent (..., in_channels * h * w), as z_{l+1} is for the
    conditionals; else feature maps (n, in_channels, h, w), as the inference path passes up. The grid
    is resampled to ``out_size`` (a stride-2 unit going down, nearest-neighbour upsampling and a 3x3
    convolution going up), then a residual block and a 3x3 head give loc and the raw scale.
    """

    def __init__(self, in_channels: int, in_size: tuple[int, int], width: int, out_channels: int,
                 out_size: tuple[int, int], *, activation: str, weight_norm: bool, min_scale: float, flat_input: bool):
        super().__init__()
        options = dict(activation=activation, weight_norm=weight_norm, batch_norm=False)
        if out_size[0] < in_size[0]:
            self.resample = _unit(in_channels, width, kernel=3, stride=2, **options)
        else:
            conv = _with_weight_norm(nn.Conv2d(in_channels, width, 3, padding=1), weight_norm)
            self.resample = nn.Sequential(nn.Upsample(size=out_size), conv)
        self.block = ResidualBlock(width, **options)
        self.act = ACTIVATIONS[activation]()
        self.head = _with_weight_norm(nn.Conv2d(width, 2 * out_channels, 3, padding=1), weight_norm)
        self.in_shape, self.flat_input, self.min_scale = (in_channels, *in_size), flat_input, min_scale

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = h.shape[:-1] if self.flat_input else h.shape[:-3]
        h = h.reshape(-1, *self.in_shape)  # (n, in_channels, h, w)
        features = self.block(self.resample(h))  # (n, width, H, W)
        loc, raw_scale = (part.flatten(1).unflatten(0, batch) for part in self.head(self.act(features)).chunk(2, dim=1))
        return loc, F.softplus(raw_scale) + self.min_scale, features


def _grids(c, image_shape) -> list[tuple[int, tuple[int, int]]]:
    """(channels, (H, W)) of each layer, bottom first; a ConfigError for sizes that do not fit."""
    options = c.network_options
    channels = options.get("latent_channels")
    if channels is None:
        raise ConfigError("a stack on the residual network needs its spatial latent: set "
                          "model.network_options.latent_channels (the channels of z1, e.g. 16)")
    size = resnet_levels(image_shape[1], image_shape[2], options.get("stages"))[-1]
    grids = []
    for layer, numbers in enumerate(c.latents, start=1):
        if layer > 1:
            size = (-(-size[0] // 2), -(-size[1] // 2))
        positions = size[0] * size[1]
        if numbers % positions:
            raise ConfigError(f"model.latents: layer z{layer} has {numbers} numbers, not a whole number of channels "
                              f"at its {size[0]}x{size[1]} grid ({positions} positions); use a multiple of {positions}")
        grids.append((numbers // positions, size))
    if grids[0][0] != channels:
        raise ConfigError(f"model.latents[0] = {c.latents[0]} must be z1's size, latent_channels x H x W = "
                          f"{channels * math.prod(grids[0][1])}")
    return grids


def build_resnet_stack(c, image_shape: tuple[int, ...], likelihood: nn.Module, make_prior) -> HierarchicalVAE:
    """The residual stack a model config with ``latents`` and ``network = "resnet"`` describes."""
    grids = _grids(c, image_shape)
    options = dict(c.network_options)
    encoder, decoder = build_resnet(image_shape, c.latents[0], image_shape[0] * likelihood.outputs_per_pixel,
                                    hidden=tuple(c.hidden), activation=c.activation, min_scale=c.min_scale, **options)
    width = encoder.head.in_channels  # the encoder's features at z1's resolution
    common = dict(activation=c.activation, weight_norm=options.get("weight_norm", True), min_scale=c.min_scale)
    nets: list[nn.Module] = [EncoderLayer(encoder)]
    conditionals = []
    for layer in range(1, len(grids)):  # layer index of the upper one, 0-based
        (low_c, low_size), (up_c, up_size) = grids[layer - 1], grids[layer]
        nets.append(SpatialGaussianNet(width, low_size, width, up_c, up_size, flat_input=False, **common))
        conditionals.append(SpatialGaussianNet(up_c, up_size, width, low_c, low_size, flat_input=True, **common))
    posterior = StackEncoder(nets, c.inference, len(image_shape), flatten=False)
    skip = None
    if c.decoder_skip:  # the features p(z_1 | z_2) is computed from, into the decoder's first convolution
        conv = nn.Conv2d(width, decoder.dense.out_channels, 3, padding=1)
        skip = nn.Sequential(ACTIVATIONS[c.activation](), _with_weight_norm(conv, common["weight_norm"]))
    prior = make_prior(c.latents[-1], posterior)
    return HierarchicalVAE(prior, conditionals, decoder, likelihood, posterior, image_shape, tuple(c.latents), skip)
