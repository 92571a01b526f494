"""Plain PyTorch networks: the encoder and decoder of a VAE.

No Pyro here. The encoder maps an image to the parameters of q(z|x); the decoder maps a code z to
the raw outputs that a likelihood turns into a distribution over images.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.options import OptionError

__all__ = [
    "ACTIVATIONS", "NETWORKS", "MLPEncoder", "MLPDecoder", "ConvEncoder", "ConvDecoder", "build_mlp",
    "build_conv", "ResidualBlock", "ResNetEncoder", "ResNetDecoder", "build_resnet", "resnet_levels", "network_for",
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

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``context``: added to the first layer's pre-activation, (batch, hidden[0]) (a stack's skip)."""
        out = self.net(z) if context is None else self.net[1:](self.net[0](z) + context)  # (batch, prod(image_shape))
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
    if not isinstance(channels, (list, tuple)) or not channels or \
            any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in channels):
        raise OptionError("channels", f"must be one or more positive widths, e.g. (32, 64); got {channels!r}")
    channels = tuple(channels)
    encoder = ConvEncoder(image_shape, z_dim, channels, hidden, activation, min_scale)
    decoder = ConvDecoder(z_dim, (out_channels, *image_shape[1:]), channels, tuple(reversed(hidden)), activation)
    return encoder, decoder


# --- residual networks for colour images ---------------------------------------------------------
def _with_weight_norm(layer: nn.Module, weight_norm: bool) -> nn.Module:
    """``layer`` with its weight as g * v / ||v|| (one g per output unit) when ``weight_norm``.

    Salimans and Kingma (2016); ``torch.nn.utils.parametrizations.weight_norm`` keeps g and v as the
    parameters (``parametrizations.weight.original0`` and ``original1``) and starts with g = ||v||,
    so the layer computes at first what it would compute without the normalization.
    """
    if not weight_norm:
        return layer
    from torch.nn.utils.parametrizations import weight_norm as apply_weight_norm

    return apply_weight_norm(layer)


def _shrink(layer: nn.Module, factor: float) -> None:
    """Scale a layer's initial weights by ``factor`` (its g under weight normalization)."""
    with torch.no_grad():
        if hasattr(layer, "parametrizations"):
            layer.parametrizations.weight.original0.mul_(factor)
        else:
            layer.weight.mul_(factor)


def _unit(n_in: int, n_out: int, *, kernel: int, stride: int = 1, activation: str, weight_norm: bool,
          batch_norm: bool) -> nn.Sequential:
    """[batch norm] -> activation -> convolution: one pre-activation unit (He et al. 2016).

    The padding keeps H and W for stride 1 and gives ceil(H / 2) x ceil(W / 2) for stride 2.
    """
    layers: list[nn.Module] = [nn.BatchNorm2d(n_in)] if batch_norm else []
    conv = nn.Conv2d(n_in, n_out, kernel_size=kernel, stride=stride, padding=kernel // 2)
    layers += [ACTIVATIONS[activation](), _with_weight_norm(conv, weight_norm)]
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """h -> h + f(h), where f is two 3x3 pre-activation units; H, W and the width are kept.

    The second convolution starts at a tenth of its usual scale, so each block starts close to the
    identity and a deep stack starts as a shallow one (and every parameter still gets a gradient from
    the first step, unlike a zero start).
    """

    def __init__(self, width: int, *, activation: str, weight_norm: bool, batch_norm: bool):
        super().__init__()
        options = dict(activation=activation, weight_norm=weight_norm, batch_norm=batch_norm)
        self.branch = nn.Sequential(_unit(width, width, kernel=3, **options), _unit(width, width, kernel=3, **options))
        _shrink(self.branch[1][-1], 0.1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)  # (n, width, H, W), in the memory format of h


def resnet_levels(height: int, width: int, stages: int | None) -> list[tuple[int, int]]:
    """The (H, W) of each resolution level: the image's, then ceil halvings, ``stages`` of them.

    ``stages=None`` halves while the smaller side stays at least 4: 32 -> 16 -> 8 -> 4 (3 stages),
    64 -> ... -> 4 (4), 28 -> 14 -> 7 -> 4 (3), and none for images under 7 pixels a side.
    """
    levels = [(height, width)]
    while (stages is None and -(-min(levels[-1]) // 2) >= 4) or (stages is not None and len(levels) <= stages):
        h, w = levels[-1]
        levels.append((-(-h // 2), -(-w // 2)))
    return levels


def _dense(sizes: list[int], activation: str, weight_norm: bool, *, last_activation: bool) -> nn.Sequential:
    """Linear layers (weight-normalized when asked) with ``activation`` between them, and after the
    last one when ``last_activation``."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(_with_weight_norm(nn.Linear(n_in, n_out), weight_norm))
        if last_activation or i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class ResNetEncoder(nn.Module):
    """x -> (loc, scale) of a diagonal Gaussian over a flat z: residual blocks at each resolution.

    A 3x3 convolution takes the C image channels to ``widths[0]``; each level runs ``blocks``
    residual blocks, then a stride-2 3x3 unit halves H and W (rounding up) and moves to the next
    level's width. The last level's features are flattened into fully connected layers (``hidden``)
    and a linear head gives loc and the raw scale, ``scale = softplus(raw) + min_scale`` as in
    :class:`MLPEncoder`, and at most ``MAX_SCALE``: with parameters gone far astray a deep stack
    overflows, and the bound keeps the scale finite even then. The leading dimensions of x may be any
    batch dimensions.
    """

    MAX_SCALE = 1e3  # a thousand times the standard Normal prior's scale

    def __init__(self, image_shape: tuple[int, ...], z_dim: int, levels: list[tuple[int, int]],
                 widths: list[int], blocks: int, hidden: tuple[int, ...], *, activation: str, min_scale: float,
                 weight_norm: bool, batch_norm: bool, channels_last: bool, latent_channels: int | None = None):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.latent_channels = latent_channels
        self.min_scale = min_scale
        self.channels_last = channels_last
        options = dict(activation=activation, weight_norm=weight_norm, batch_norm=batch_norm)
        layers: list[nn.Module] = [_with_weight_norm(nn.Conv2d(image_shape[0], widths[0], 3, padding=1), weight_norm)]
        for level, width in enumerate(widths):
            layers += [ResidualBlock(width, **options) for _ in range(blocks)]
            if level < len(widths) - 1:
                layers.append(_unit(width, widths[level + 1], kernel=3, stride=2, **options))
        layers += [nn.BatchNorm2d(widths[-1])] if batch_norm else []
        layers.append(ACTIVATIONS[activation]())
        self.convs = nn.Sequential(*layers)
        if latent_channels is not None:  # a spatial latent: a 3x3 convolution gives loc and scale per position
            self.head = _with_weight_norm(nn.Conv2d(widths[-1], 2 * latent_channels, 3, padding=1), weight_norm)
            return
        flat = widths[-1] * levels[-1][0] * levels[-1][1]
        self.dense = _dense([flat, *hidden], activation, weight_norm, last_activation=True)
        self.head = _with_weight_norm(nn.Linear(hidden[-1] if hidden else flat, 2 * z_dim), weight_norm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[:-3]  # any leading batch dims (e.g. particles, batch)
        x = x.reshape(-1, *x.shape[-3:])  # (n, C, H, W); keeps the strides of a 4-d input
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.convs(x)  # (n, widths[-1], H_L, W_L)
        if self.latent_channels is not None:  # (n, 2c, H_L, W_L) -> two (..., c * H_L * W_L), channel-major
            loc, raw_scale = (part.flatten(1).unflatten(0, batch) for part in self.head(features).chunk(2, dim=1))
            return loc, F.softplus(raw_scale).clamp(max=self.MAX_SCALE) + self.min_scale
        h = self.dense(features.flatten(1)).unflatten(0, batch)  # (..., hidden[-1]); flatten copies NHWC
        loc, raw_scale = self.head(h).chunk(2, dim=-1)  # (..., z_dim) each
        return loc, F.softplus(raw_scale).clamp(max=self.MAX_SCALE) + self.min_scale


class ResNetDecoder(nn.Module):
    """z -> (batch, out_channels, H, W): the mirror of :class:`ResNetEncoder`.

    Fully connected layers map z to the features of the coarsest level; each level runs ``blocks``
    residual blocks, then a unit upsamples (nearest neighbour, to exactly the next level's H and W)
    and applies a 3x3 convolution to the next width. A last 1x1 unit gives the ``out_channels`` the
    likelihood asks for (``outputs_per_pixel * C``).
    """

    def __init__(self, z_dim: int, out_shape: tuple[int, ...], levels: list[tuple[int, int]],
                 widths: list[int], blocks: int, hidden: tuple[int, ...], *, activation: str,
                 weight_norm: bool, batch_norm: bool, channels_last: bool, latent_channels: int | None = None):
        super().__init__()
        out_channels = out_shape[0]
        self.channels_last = channels_last
        if latent_channels is not None:  # a spatial latent: a 3x3 convolution from its c channels
            self.start = (latent_channels, *levels[-1])
            self.dense = _with_weight_norm(nn.Conv2d(latent_channels, widths[-1], 3, padding=1), weight_norm)
        else:
            self.start = (widths[-1], *levels[-1])
            self.dense = _dense([z_dim, *hidden, math.prod(self.start)], activation, weight_norm, last_activation=False)
        self.spatial = latent_channels is not None
        options = dict(activation=activation, weight_norm=weight_norm, batch_norm=batch_norm)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            layers += [ResidualBlock(widths[level], **options) for _ in range(blocks)]
            if level > 0:
                norm = [nn.BatchNorm2d(widths[level])] if batch_norm else []
                conv = nn.Conv2d(widths[level], widths[level - 1], 3, padding=1)
                layers.append(nn.Sequential(*norm, ACTIVATIONS[activation](), nn.Upsample(size=levels[level - 1]),
                                            _with_weight_norm(conv, weight_norm)))
        layers.append(_unit(widths[0], out_channels, kernel=1, **options))
        self.convs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``context`` (spatial latent only): added to the first convolution's output, (n, widths[-1],
        H_L, W_L) with the batch dims flattened into n (a stack's skip from the top-down path)."""
        batch = z.shape[:-1]  # any leading batch dims (e.g. particles, batch)
        z = z.reshape(-1, z.shape[-1])
        if self.spatial:
            z = z.unflatten(-1, self.start)  # (n, c, H_L, W_L)
            if self.channels_last:
                z = z.contiguous(memory_format=torch.channels_last)
            h = self.dense(z) if context is None else self.dense(z) + context  # (n, widths[-1], H_L, W_L)
        else:
            h = self.dense(z).unflatten(-1, self.start)  # (n, widths[-1], H_L, W_L)
            if self.channels_last:
                h = h.contiguous(memory_format=torch.channels_last)
        out = self.convs(h)  # (n, out_channels, H, W)
        return out.unflatten(0, batch)  # (..., out_channels, H, W)


def build_resnet(image_shape: tuple[int, ...], z_dim: int, out_channels: int, *, hidden: tuple[int, ...],
                 activation: str = "elu", min_scale: float = 1e-4, width: int = 32, blocks: int = 1,
                 stages: int | None = None, max_width: int = 256, weight_norm: bool = True,
                 batch_norm: bool = False, channels_last: bool = False,
                 latent_channels: int | None = None) -> tuple[nn.Module, nn.Module]:
    """Residual convolutional encoder x -> (loc, scale) and its mirror, decoder z -> (batch, out_channels, H, W).

    Made for 32x32 and 64x64 colour images (CIFAR-10, faces), and general: any image of at least
    one pixel a side, grey or colour. The latent is always a vector of ``z_dim`` numbers to the
    prior and the guide, so every prior, posterior (the IAF's flows included) and likelihood in the
    registries works with it unchanged. Two shapes behind that vector:

    - flat (``latent_channels`` unset): fully connected layers (``hidden``) from the coarsest
      level's features to z, and back;
    - spatial (``latent_channels = c``): z is a c-channel feature map at the coarsest level, H_L x
      W_L (so ``z_dim`` must be c * H_L * W_L, channel-major), reached by a 3x3 convolution, as the
      latents of the IAF paper's ResNet VAE are; ``hidden`` is unused. Each latent then describes a
      patch of the image rather than the whole of it, and the decoder needs far fewer parameters.
      Set the resolution with ``stages`` (for 32x32: 1 gives 16x16, 2 gives 8x8).

    Options (``model.network_options``; ``model.activation`` is the nonlinearity, ``elu`` in the
    configs here):

    - ``width``: channels at full resolution; each halving doubles them, up to ``max_width``, so
      every level costs about the same.
    - ``blocks``: residual blocks per resolution level (the depth), in the encoder and the decoder.
      The defaults (32 and 1) train CIFAR-10 at about 13 ms per image and step on two CPU cores;
      width 64 costs 2.6 times that, two blocks 1.7 times.
    - ``stages``: halvings of H and W (rounding up); ``None`` halves while the smaller side stays at
      least 4 pixels (3 for 32x32, 4 for 64x64), see :func:`resnet_levels`.
    - ``weight_norm``: weight normalization of every convolution and linear layer. The IAF paper's
      appendix (Kingma et al. 2016) reports ELU with weight normalization beating ReLU with batch
      normalization; the layers start at PyTorch's default scale, not at a data-dependent one.
    - ``batch_norm``: batch normalization before every activation of the convolutional layers, for
      the ReLU + batch norm comparison (off by default). Its statistics are the batch's in training
      mode and running averages after ``vae.eval()``; the VampPrior's pseudo-inputs, which go
      through the encoder too, enter the batch's statistics.
    - ``channels_last``: run the convolutions on NHWC tensors (the weights too). The function is the
      same; oneDNN on the CPU, and tensor cores on a GPU, are often faster that way. The outputs
      are returned in that memory format, with the usual (N, C, H, W) shape.

    - ``latent_channels``: see above.

    A value out of range raises :class:`pyrovae.config.OptionError`, a ``ValueError`` (``build_vae``
    reports it as a config error naming the field).
    """
    _, h, w = image_shape
    levels = _resnet_checked_levels(h, w, z_dim, width=width, blocks=blocks, stages=stages, max_width=max_width,
                                    weight_norm=weight_norm, batch_norm=batch_norm, channels_last=channels_last,
                                    latent_channels=latent_channels)
    widths = [min(width * 2 ** i, max_width) for i in range(len(levels))]
    options = dict(activation=activation, weight_norm=weight_norm, batch_norm=batch_norm, channels_last=channels_last,
                   latent_channels=latent_channels)
    hidden = tuple(hidden)
    encoder = ResNetEncoder(image_shape, z_dim, levels, widths, blocks, hidden, min_scale=min_scale, **options)
    decoder = ResNetDecoder(z_dim, (out_channels, h, w), levels, widths, blocks, tuple(reversed(hidden)), **options)
    if channels_last:
        encoder.to(memory_format=torch.channels_last)
        decoder.to(memory_format=torch.channels_last)
    return encoder, decoder


def _resnet_checked_levels(h: int, w: int, z_dim: int, *, width, blocks, stages, max_width, weight_norm, batch_norm,
                           channels_last, latent_channels) -> list[tuple[int, int]]:
    """The resolution levels of :func:`build_resnet` for h x w images, once its options are checked
    (an :class:`OptionError` naming the first bad one; a ``ValueError`` for a ``z_dim`` that does not
    fit a spatial latent)."""
    for name, value, low in (("width", width, 1), ("blocks", blocks, 1), ("max_width", max_width, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise OptionError(name, f"must be an integer of at least {low}, got {value!r}")
    if max_width < width:
        raise OptionError("max_width", f"({max_width}) must be at least width ({width}): raise it or lower width")
    most = max(0, math.ceil(math.log2(min(h, w))))  # halvings until the smaller side is 1 pixel
    if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int) or not 0 <= stages <= most):
        raise OptionError("stages", f"must be None (chosen from the image size) or an integer from 0 to {most} "
                                    f"for {h}x{w} images (halvings until 1 pixel a side), got {stages!r}")
    for name, value in (("weight_norm", weight_norm), ("batch_norm", batch_norm), ("channels_last", channels_last)):
        if not isinstance(value, bool):
            raise OptionError(name, f"must be true or false, got {value!r}")
    levels = resnet_levels(h, w, stages)
    if latent_channels is not None:
        if isinstance(latent_channels, bool) or not isinstance(latent_channels, int) or latent_channels < 1:
            raise OptionError("latent_channels", f"must be a positive integer or unset (a flat latent), "
                                                 f"got {latent_channels!r}")
        size = latent_channels * levels[-1][0] * levels[-1][1]
        if z_dim != size:
            raise ValueError(f"a spatial latent of {latent_channels} channels at {levels[-1][0]}x{levels[-1][1]} "
                             f"(the coarsest level of {h}x{w} images after {len(levels) - 1} halvings) has "
                             f"{size} numbers: set z_dim = {size}, or change latent_channels or stages")
    return levels


#: Encoder/decoder pairs by config name: a builder taking (image_shape, z_dim, out_channels, **options).
NETWORKS = {
    "mlp": build_mlp,
    "conv": build_conv,
    "resnet": build_resnet,
}


def network_for(image_shape: tuple[int, ...]) -> str:
    """The network ``network = "auto"`` picks: convolutional for colour images when available, else MLP."""
    return "conv" if image_shape[0] == 3 and "conv" in NETWORKS else "mlp"
