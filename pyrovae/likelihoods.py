"""Likelihoods p(x|z): they turn decoder outputs into a distribution over images.

A likelihood declares ``outputs_per_pixel``: the decoder produces ``outputs_per_pixel * C`` channels
for images of C channels, and ``forward(outputs)`` returns a distribution whose event shape is the
image shape (C, H, W). ``check(x)`` rejects data outside the support with an error that says what to
do instead; ``mean(outputs)`` gives E[x|z] for pictures.

Data, by ``data_kind``, always float tensors of shape (batch, C, H, W):

* ``"binary"``: every pixel 0. or 1.
* ``"unit"``: grey levels in [0, 1], such as uint8 images divided by 255.
* ``"8bit"``: 8-bit images stored as ``uint8 / 255``, floats on the grid k/255, k = 0..255. Discrete
  likelihoods put their mass on these 256 levels, in bins of width 1/255 centred on them, so their
  -log p(x) / (C H W ln 2) is bits per dimension as it stands. Binary images are 8-bit images too
  (levels 0 and 255).

Decoder outputs: with P = ``outputs_per_pixel`` and C channels, output channels ``p*C .. (p+1)*C - 1``
hold parameter p for each of the C image channels (``outputs.chunk(P, dim=1)``).

To add a likelihood: subclass :class:`Likelihood`, implement those, and add it to ``LIKELIHOODS``;
check every option in ``__init__`` (see :mod:`pyrovae.priors`).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from pyrovae.options import OptionError, option_int, option_number

__all__ = [
    "LIKELIHOODS", "Likelihood", "DataSupportError", "BernoulliLikelihood", "ContinuousBernoulliLikelihood",
    "LocationScaleLikelihood", "NormalLikelihood", "LaplaceLikelihood", "DiscretizedLogisticLikelihood",
    "DiscretizedLogisticMixture",
]


class DataSupportError(ValueError):
    """The data lies outside the support of the likelihood."""


class Likelihood(nn.Module):
    """Base class. ``data_kind`` says what the data must be: "binary", "unit" ([0, 1]) or "8bit"."""

    outputs_per_pixel: int = 1
    data_kind: str = "unit"

    def __init__(self):  # no options unless a subclass declares them
        super().__init__()

    @classmethod
    def build(cls, image_shape: tuple[int, ...], **options) -> "Likelihood":
        return cls(**options)

    def check(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def mean(self, outputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, outputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per image, shape ``outputs.shape[:-3]``; ``x`` broadcasts against the outputs.

        This is ``self(outputs).log_prob(x)``. The importance-sampled log-likelihood in
        :mod:`pyrovae.evaluate`, which calls it millions of times, has its own faster form of the
        Bernoulli's; every other likelihood is scored here.
        """
        return self(outputs).log_prob(x)


class BernoulliLikelihood(Likelihood):
    """x_i ~ Bernoulli(sigmoid(logit_i)) independently per pixel, for binary images."""

    outputs_per_pixel = 1
    data_kind = "binary"

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        # logits: (batch, C, H, W); the three image dims are one event
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(3)  # (C, H, W) is one event; any batch dims before it

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def check(self, x: torch.Tensor) -> None:
        if not bool(((x == 0) | (x == 1)).all()):
            bad = x[(x != 0) & (x != 1)]
            raise DataSupportError(
                "the Bernoulli likelihood needs binary data (every pixel 0 or 1), but got values "
                f"such as {bad[:3].tolist()} (range {x.min().item():.3g} to {x.max().item():.3g}). "
                "Binarize grey levels first, e.g. x = torch.bernoulli(x) for a dynamic "
                "binarization, or (x > 0.5).float() for a fixed threshold; or use a likelihood for "
                "grey levels such as the continuous Bernoulli."
            )


def _value_range(x: torch.Tensor) -> str:
    return f"range {x.min().item():.4g} to {x.max().item():.4g}"


def _check_unit_interval(x: torch.Tensor, name: str) -> None:
    if not bool(((x >= 0) & (x <= 1)).all()):  # also false for NaN
        raise DataSupportError(
            f"the {name} likelihood needs grey levels in [0, 1], but got values outside it "
            f"({_value_range(x)}). Scale 8-bit images with x = images.float() / 255."
        )


class ContinuousBernoulliLikelihood(Likelihood):
    """x_i ~ ContinuousBernoulli(sigmoid(logit_i)) per pixel: a density on [0, 1] for grey levels.

    Loaiza-Ganem and Cunningham (2019): p(x|lambda) = C(lambda) lambda^x (1 - lambda)^(1 - x), the
    Bernoulli form made a proper density by its normalizing constant C(lambda). Its mean is not
    lambda = sigmoid(logit): it is lambda / (2 lambda - 1) + 1 / (2 artanh(1 - 2 lambda)), which
    ``mean`` returns.
    """

    outputs_per_pixel = 1
    data_kind = "unit"

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        # logits: (batch, C, H, W)
        return dist.ContinuousBernoulli(logits=logits, validate_args=False).to_event(3)  # (C, H, W) is one event; any batch dims before it

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return dist.ContinuousBernoulli(logits=logits, validate_args=False).mean

    def check(self, x: torch.Tensor) -> None:
        _check_unit_interval(x, "continuous Bernoulli")


class LocationScaleLikelihood(Likelihood):
    """Base of the normal and Laplace likelihoods: x_i ~ family(loc_i, scale_i), loc from the decoder.

    Args:
        scale: ``"fixed"`` (``scale_value`` throughout), ``"learned"`` (one scale for all pixels,
            learned, starting at ``scale_value``) or ``"per_pixel"`` (the decoder predicts a raw
            scale for every pixel, as a second output per pixel).
        scale_value: the fixed scale, or the starting value of the learned one; unused per pixel.
        min_scale: floor on learned and per-pixel scales, ``scale = softplus(raw) + min_scale``: a
            density on data it can fit exactly would otherwise grow without bound as the scale
            shrinks.
    """

    family: type[dist.Distribution]
    name: str
    SCALES = ("fixed", "learned", "per_pixel")
    data_kind = "unit"

    def __init__(self, scale: str = "learned", scale_value: float = 0.1, min_scale: float = 1e-3):
        super().__init__()
        if scale not in self.SCALES:
            raise OptionError("scale", f"must be {', '.join(self.SCALES[:-1])} or {self.SCALES[-1]}: unknown scale "
                                       f"{scale!r} for the {self.name} likelihood; valid: {', '.join(self.SCALES)}")
        min_scale = option_number("min_scale", min_scale, strict=False,
                                  meaning="the floor on learned and per-pixel scales, e.g. 1e-3")
        scale_value = option_number("scale_value", scale_value, meaning="the fixed scale, or the starting value of "
                                                                        "the learned one, e.g. 0.1")
        if scale == "learned" and not scale_value > min_scale:
            raise OptionError("scale_value", f"must exceed min_scale={min_scale} with a learned scale (the scale "
                                             f"starts there), got scale_value={scale_value!r}: raise it or lower "
                                             "min_scale")
        self.scale_kind = scale
        self.min_scale = min_scale
        self.outputs_per_pixel = 2 if scale == "per_pixel" else 1
        if scale == "fixed":
            self.register_buffer("fixed_scale", torch.tensor(float(scale_value)))
        elif scale == "learned":
            # softplus^{-1}(scale_value - min_scale), so that the scale starts at scale_value; as
            # y + log(1 - e^-y), which does not overflow for a large y
            y = scale_value - min_scale
            self.raw_scale = nn.Parameter(torch.tensor(y + math.log(-math.expm1(-y))))

    def loc_scale(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel location and scale, each (batch, C, H, W), from decoder outputs."""
        if self.scale_kind == "per_pixel":
            loc, raw = outputs.chunk(2, dim=-3)  # the channel dim, after any particle and batch dims
            return loc, F.softplus(raw) + self.min_scale
        if self.scale_kind == "learned":
            return outputs, (F.softplus(self.raw_scale) + self.min_scale).expand_as(outputs)
        return outputs, self.fixed_scale.expand_as(outputs)

    def forward(self, outputs: torch.Tensor) -> dist.Distribution:
        loc, scale = self.loc_scale(outputs)
        return self.family(loc, scale, validate_args=False).to_event(3)

    def mean(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.loc_scale(outputs)[0]

    def check(self, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise DataSupportError(
                f"the {self.name} likelihood needs finite pixel values, but the data holds NaN or infinite "
                "ones. Remove or repair those images before training."
            )


class NormalLikelihood(LocationScaleLikelihood):
    """x_i ~ N(loc_i, scale^2) per pixel: a density on the real line, for grey levels.

    Options as in :class:`LocationScaleLikelihood`. Its log-density on 8-bit data is not a discrete
    log-likelihood (it is not bounded by 0); use the discretized logistic for bits per dimension.
    """

    family = dist.Normal
    name = "normal"


class LaplaceLikelihood(LocationScaleLikelihood):
    """x_i ~ Laplace(loc_i, scale) per pixel: an L1 reconstruction error with a scale.

    log p(x_i|z) = -|x_i - loc_i| / scale - log(2 scale); ``mean`` is loc (the mean and the median).
    Options as in :class:`LocationScaleLikelihood`.
    """

    family = dist.Laplace
    name = "Laplace"


def _log_expm1(d: torch.Tensor) -> torch.Tensor:
    """log(exp(d) - 1) for d > 0, without overflow for large d or cancellation for small d."""
    return d + torch.log(-torch.expm1(-d))


class DiscretizedLogisticMixture(TorchDistribution):
    """A mixture of K discretized logistics on the 256 levels k/255, k = 0..255 (one per element).

    Salimans et al. (2017), PixelCNN++: component k puts on level v the mass of a logistic
    (loc_k, scale_k) over the bin [v - 1/510, v + 1/510]; the first and last levels take the tails
    below and above, so the masses sum to one. Parameters carry the mixture on the last dimension:
    ``logits``, ``loc``, ``scale`` of shape (..., K); batch shape (...), event shape ().

    Values are floats on the grid k/255; a value off the grid is scored as its nearest level.
    """

    arg_constraints = {"logits": constraints.real, "loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    has_rsample = False
    levels = 256

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        self.logits, self.loc, self.scale = torch.broadcast_tensors(logits, loc, scale)
        super().__init__(self.loc.shape[:-1], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogisticMixture, _instance)
        shape = torch.Size(batch_shape) + self.loc.shape[-1:]
        new.logits, new.loc, new.scale = self.logits.expand(shape), self.loc.expand(shape), self.scale.expand(shape)
        super(DiscretizedLogisticMixture, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        top = self.levels - 1
        level = torch.round(value * top).clamp(0, top).unsqueeze(-1)  # (..., 1) integer level
        centred = level / top - self.loc  # (..., K)
        inv_scale = self.scale.reciprocal()
        upper = inv_scale * (centred + 0.5 / top)  # standardized upper and lower bin edges
        lower = inv_scale * (centred - 0.5 / top)
        # log(sigmoid(upper) - sigmoid(lower)) = log(expm1(upper - lower)) - softplus(-lower) - softplus(upper)
        inner = _log_expm1(inv_scale / top) - F.softplus(-lower) - F.softplus(upper)
        first = -F.softplus(-upper)  # log sigmoid(upper): all the mass below the first edge
        last = -F.softplus(lower)  # log(1 - sigmoid(lower)): all the mass above the last edge
        log_mass = torch.where(level == 0, first, torch.where(level == top, last, inner))  # (..., K)
        if log_mass.shape[-1] == 1:
            return log_mass.squeeze(-1)
        return torch.logsumexp(F.log_softmax(self.logits, dim=-1) + log_mass, dim=-1)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        k = dist.Categorical(logits=self.logits).sample(sample_shape).unsqueeze(-1)  # (*shape, 1)
        loc = self.loc.expand(shape + self.loc.shape[-1:]).gather(-1, k).squeeze(-1)
        scale = self.scale.expand(shape + self.scale.shape[-1:]).gather(-1, k).squeeze(-1)
        finfo = torch.finfo(loc.dtype)
        u = torch.rand(shape, dtype=loc.dtype, device=loc.device).clamp(finfo.tiny, 1 - finfo.eps)
        x = loc + scale * (torch.log(u) - torch.log1p(-u))  # a logistic draw
        top = self.levels - 1
        return torch.round(x * top).clamp(0, top) / top  # its bin's level

    @property
    def mean(self) -> torch.Tensor:
        # E[X] = sum over the 255 inner edges e of (1/255) P(X > e), P(X > e) = sigmoid((loc - e) / scale)
        top = self.levels - 1
        inv_scale = self.scale.reciprocal()
        above = torch.zeros_like(self.loc)
        for j in range(1, self.levels):
            above = above + torch.sigmoid((self.loc - (j - 0.5) / top) * inv_scale)
        return (F.softmax(self.logits, dim=-1) * above).sum(-1) / top


class DiscretizedLogisticLikelihood(Likelihood):
    """x_i ~ a mixture of discretized logistics per pixel, for 8-bit images (PixelCNN++ style).

    The data are ``uint8 / 255`` (levels k/255); see :class:`DiscretizedLogisticMixture`. Colour
    channels are independent given z (no coupling between R, G and B as in PixelCNN++). The decoder
    gives, per pixel and component, a location, a log-scale and (for K > 1) a mixture logit;
    log-scales are clamped below at -8, where a bin of width 1/255 already spans more than ten scales.

    Args:
        components: K, logistics per pixel; 1 (the default) is the plain discretized logistic of
            Kingma et al. (2016), more give the mixture of Salimans et al. (2017).
    """

    data_kind = "8bit"
    MIN_LOG_SCALE = -8.0

    def __init__(self, components: int = 1):
        super().__init__()
        option_int("components", components, meaning="logistics per pixel: 1, the default, or more, e.g. 10")
        self.components = components
        self.outputs_per_pixel = 2 if components == 1 else 3 * components

    def parameters_of(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mixture logits, locations and scales, each (..., C, H, W, K), from decoder outputs (..., P, H, W)."""
        kinds = 2 if self.components == 1 else 3
        params = outputs.unflatten(-3, (kinds, self.components, -1)).movedim(-4, -1)  # (..., kinds, C, H, W, K)
        loc, log_scale = params[..., -2, :, :, :, :], params[..., -1, :, :, :, :].clamp(min=self.MIN_LOG_SCALE)
        logits = params[..., 0, :, :, :, :] if kinds == 3 else torch.zeros_like(loc)
        return logits, loc, log_scale.exp()

    def forward(self, outputs: torch.Tensor) -> dist.Distribution:
        per_pixel = DiscretizedLogisticMixture(*self.parameters_of(outputs), validate_args=False)
        return per_pixel.to_event(3)

    def mean(self, outputs: torch.Tensor) -> torch.Tensor:
        return DiscretizedLogisticMixture(*self.parameters_of(outputs), validate_args=False).mean

    def check(self, x: torch.Tensor) -> None:
        levels = x * 255
        on_grid = (x >= 0) & (x <= 1) & ((levels - levels.round()).abs() < 1e-3)
        if not bool(on_grid.all()):
            raise DataSupportError(
                "the discretized logistic likelihood needs 8-bit images stored as uint8 / 255 (values "
                f"k/255 for k = 0..255), but got values off that grid ({_value_range(x)}). Convert "
                "uint8 images with x = images.float() / 255, or quantize with torch.round(x * 255) / 255; "
                "for grey levels that are not 8-bit use a density such as the continuous Bernoulli or "
                "the normal likelihood."
            )


#: Likelihoods by config name.
LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": BernoulliLikelihood,
    "continuous_bernoulli": ContinuousBernoulliLikelihood,
    "normal": NormalLikelihood,
    "laplace": LaplaceLikelihood,
    "discretized_logistic": DiscretizedLogisticLikelihood,
}
