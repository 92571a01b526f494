"""Priors p(z). Each is a module whose ``forward()`` returns a distribution with event shape (z_dim,).

Parameters (learned or fixed) are owned by the module, as buffers or ``nn.Parameter``s, so they move
to the training device, train with everything else and are saved in checkpoints.

To add a prior: subclass :class:`Prior`, take ``z_dim`` (and any options) in ``__init__``, return
p(z) from ``forward()``, and add the class to ``PRIORS``. A prior that needs more of the VAE (the
VampPrior needs the guide) overrides ``build``. Every option is checked in ``__init__``, before it
reaches torch or Pyro, with :func:`pyrovae.config.option_int` and its kin, which raise
:class:`pyrovae.config.OptionError` naming the option.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import spline_autoregressive
from torch import nn
from torch.distributions import constraints
from torch.distributions.utils import lazy_property

from pyrovae.options import OptionError, option_int, option_number, option_widths

__all__ = [
    "PRIORS", "Prior", "DiagonalNormalMixture", "StandardNormalPrior", "LearnedNormalPrior", "MixtureOfGaussiansPrior",
    "VampPrior", "FlowPrior", "LaplacePrior", "StudentTPrior",
]


class Prior(nn.Module):
    """Base class: ``forward()`` -> p(z) with event shape (z_dim,)."""

    @classmethod
    def build(cls, z_dim: int, *, posterior: nn.Module, image_shape: tuple[int, ...], **options) -> "Prior":
        """Construct from a config; ``posterior`` and ``image_shape`` are there for priors that need them."""
        return cls(z_dim, **options)


class _StandardPrior(Prior):
    """Independent coordinates from a fixed location-scale ``family`` at location 0, scale 1."""

    family = dist.Normal

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self) -> dist.Distribution:
        return self.family(self.loc, self.scale).to_event(1)


class StandardNormalPrior(_StandardPrior):
    """p(z) = N(0, I): the prior of Kingma and Welling (2014)."""

    family = dist.Normal


class LearnedNormalPrior(Prior):
    """p(z) = N(m, diag(s^2)) with m and log s learned (initially N(0, I))."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.loc = nn.Parameter(torch.zeros(z_dim))
        self.log_scale = nn.Parameter(torch.zeros(z_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)


class DiagonalNormalMixture(dist.TorchDistribution):
    """sum_k pi_k N(z; m_k, diag(s_k^2)) over z in R^D, scored with one matrix product.

    The same density as ``MixtureSameFamily(Categorical(logits), Normal(loc, scale).to_event(1))``,
    computed without the (points, K, D) tensor that one builds. Expanding the square,

        log pi_k N(z; m_k, s_k^2) = [z^2, z] . [-1/(2 s_k^2), m_k/s_k^2] + c_k,
        c_k = log pi_k - sum_j (m_kj^2 / (2 s_kj^2) + log s_kj) - (D/2) log 2 pi,

    so every point's log joint with every component is one (points, 2D) x (2D, K) product plus a
    (K,) bias, followed by a log-sum-exp over the K components. The expansion subtracts large numbers
    when the scales are small (a VampPrior's components are encoder posteriors), so it runs in
    float64 and the result is returned in the input's dtype.

    Args:
        logits: (K,) unnormalized log mixture weights.
        loc, scale: (K, D) component means and standard deviations.
    """

    arg_constraints = {"logits": constraints.real_vector, "loc": constraints.real, "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        if loc.dim() != 2 or scale.shape != loc.shape or logits.shape != loc.shape[:1]:
            raise ValueError(f"expected logits (K,), loc and scale (K, D); got {tuple(logits.shape)}, "
                             f"{tuple(loc.shape)}, {tuple(scale.shape)}")
        self.logits, self.loc, self.scale = logits, loc, scale
        super().__init__(torch.Size(), loc.shape[-1:], validate_args=validate_args)

    @lazy_property
    def _linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (2D, K) weights and (K,) bias of the expansion above, in float64, computed once per
        distribution (the IWAE estimator scores many chunks with one prior)."""
        d = self.loc.shape[-1]
        loc, scale = self.loc.double(), self.scale.double()
        precision = scale.pow(-2)  # (K, D)
        weight = torch.cat([-0.5 * precision, loc * precision], -1).T  # (2D, K)
        bias = (torch.log_softmax(self.logits.double(), -1) - 0.5 * (loc.pow(2) * precision).sum(-1)
                - scale.log().sum(-1) - 0.5 * d * math.log(2 * math.pi))  # (K,)
        return weight, bias

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        z = value.reshape(-1, self.loc.shape[-1]).double()  # (N, D)
        weight, bias = self._linear_form
        log_joint = torch.addmm(bias, torch.cat([z.pow(2), z], -1), weight)  # (N, K): log pi_k N(z_n; m_k, s_k^2)
        return torch.logsumexp(log_joint, -1).to(value.dtype).reshape(value.shape[:-1])

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            k = dist.Categorical(logits=self.logits).sample(sample_shape)  # a component for each draw
            loc = self.loc[k]  # (*sample_shape, D)
            return loc + self.scale[k] * torch.randn_like(loc)


def _spread(what: str, default: float) -> str:
    """What a starting spread is, and why it must be positive: components that start alike stay alike."""
    return (f"the standard deviation of the initial {what}, e.g. {default}; at 0 every component would start, "
            "and stay, the same")


class MixtureOfGaussiansPrior(Prior):
    """p(z) = sum_k pi_k N(z; m_k, diag(s_k^2)): K diagonal Gaussians, all learned.

    Args:
        components: K, the number of Gaussians.
        init_spread: the means start as draws from N(0, init_spread^2 I), so that the components
            differ from the first step (identical components would receive identical gradients);
            the scales start at 1 and the weights uniform.
    """

    def __init__(self, z_dim: int, components: int = 10, init_spread: float = 1.0):
        super().__init__()
        option_int("components", components, meaning="the number of Gaussians in the mixture, e.g. 10")
        init_spread = option_number("init_spread", init_spread, meaning=_spread("means", 1.0))
        self.z_dim = z_dim
        self.logits = nn.Parameter(torch.zeros(components))  # (K,) unnormalized log weights
        self.loc = nn.Parameter(init_spread * torch.randn(components, z_dim))  # (K, z_dim)
        self.log_scale = nn.Parameter(torch.zeros(components, z_dim))  # (K, z_dim)

    def forward(self) -> dist.Distribution:
        return DiagonalNormalMixture(self.logits, self.loc, self.log_scale.exp())


class VampPrior(Prior):
    """The VampPrior (Tomczak and Welling 2018): p(z) = (1/K) sum_k q(z | u_k).

    A uniform mixture of the guide's own posteriors at K learned pseudo-inputs u_k, each of the image
    shape. The pseudo-inputs are ``sigmoid`` of unconstrained parameters, so they stay inside the
    data range (0, 1) of every likelihood here; they start near mid-grey, with small noise so that
    the components differ.

    The guide is shared with the VAE, not owned: it is kept as a plain reference rather than a
    submodule, so its parameters appear once in ``vae.parameters()`` and ``vae.state_dict()`` (under
    ``posterior``), and this module's own state is the pseudo-inputs alone. Moving the VAE moves both.

    With a flow guide every component is a flow distribution, and scoring z runs the flow's
    (sequential) inverse, which is slower than with the diagonal guide; it also replaces the values the
    flow cached while drawing z, so that log q(z|x), if scored afterwards, is recomputed the same way.

    Args:
        components: K, the number of pseudo-inputs.
        init_noise: standard deviation of the initial pseudo-inputs around grey 0.5, in logit units.
    """

    def __init__(self, z_dim: int, posterior: nn.Module, image_shape: tuple[int, ...],
                 components: int = 500, init_noise: float = 0.1):
        super().__init__()
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise OptionError("components", "must be a positive integer, the number of pseudo-inputs (e.g. 500): the "
                                            f"VampPrior needs at least one pseudo-input, got components={components!r}")
        init_noise = option_number("init_noise", init_noise, meaning=_spread("pseudo-inputs, in logit units", 0.1))
        self.z_dim = z_dim
        object.__setattr__(self, "posterior", posterior)  # a reference, not a submodule: see above
        self.raw_pseudo_inputs = nn.Parameter(init_noise * torch.randn(components, *image_shape))
        self.register_buffer("logits", torch.zeros(components))  # uniform weights 1/K

    @classmethod
    def build(cls, z_dim: int, *, posterior: nn.Module, image_shape: tuple[int, ...], **options) -> "VampPrior":
        return cls(z_dim, posterior, image_shape, **options)

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """The K pseudo-inputs u_k in the data range: (K, C, H, W)."""
        return torch.sigmoid(self.raw_pseudo_inputs)

    def forward(self) -> dist.Distribution:
        posteriors = self.posterior(self.pseudo_inputs)  # q(z|u_k): batch (K,), event (z_dim,)
        gaussian = posteriors.base_dist if isinstance(posteriors, dist.Independent) else None
        if isinstance(gaussian, dist.Normal) and posteriors.reinterpreted_batch_ndims == 1:  # the diagonal guide
            return DiagonalNormalMixture(self.logits, gaussian.loc, gaussian.scale)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), posteriors)


class FlowPrior(Prior):
    """p(z): a standard Normal pushed through learned autoregressive rational-quadratic spline flows.

    The flows are neural spline flows (Durkan et al. 2019), written in the direction that makes
    scoring cheap: log p(z) maps z to the base space in one pass per flow (as a masked autoregressive
    flow does), while drawing z ~ p(z) inverts each flow one coordinate at a time. Training scores z
    at every step; drawing happens only for pictures.

    Args:
        flows: the number of spline flows.
        hidden: hidden widths of each flow's autoregressive network, each at least ``z_dim``; ``None``:
            Pyro's default, two layers of ``10 * z_dim``.
        bins: spline segments per coordinate on [-bound, bound], from 1 to 1000 (Pyro's splines keep
            every segment at least 1/1000 of the interval); outside it each flow is the identity.
        bound: half-width of the interval the splines act on.
    """

    MAX_BINS = 1000

    def __init__(self, z_dim: int, flows: int = 2, hidden: tuple[int, ...] | None = None,
                 bins: int = 8, bound: float = 3.0):
        super().__init__()
        option_int("flows", flows, meaning="the number of spline flows, e.g. 2")
        widths = option_widths("hidden", hidden, low=z_dim, meaning="the autoregressive networks need a unit "
                                                                    "for each latent coordinate")
        option_int("bins", bins, high=self.MAX_BINS, meaning="spline segments per coordinate, e.g. 8")
        bound = option_number("bound", bound, meaning="half-width of the interval the splines act on, e.g. 3.0")
        self.z_dim = z_dim
        widths = list(widths) if widths is not None else None
        self.flows = nn.ModuleList(
            spline_autoregressive(z_dim, hidden_dims=widths, count_bins=bins, bound=bound) for _ in range(flows))
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self) -> dist.Distribution:
        base = dist.Normal(self.loc, self.scale).to_event(1)
        # z = f^{-1}(eps): log p(z) = log N(f(z)) + log|det df/dz|, with f the parallel direction
        return dist.TransformedDistribution(base, [flow.inv for flow in reversed(self.flows)])


class LaplacePrior(_StandardPrior):
    """p(z) = prod_j Laplace(z_j; 0, 1): heavier tails than N(0, I), fixed."""

    family = dist.Laplace


class StudentTPrior(_StandardPrior):
    """p(z) = prod_j StudentT(z_j; df, 0, 1): heavy tails, fixed.

    Args:
        df: degrees of freedom; small values give heavy tails, large ones approach N(0, I).
    """

    def __init__(self, z_dim: int, df: float = 3.0):
        df = option_number("df", df, meaning="the degrees of freedom, e.g. 3.0; for infinitely many use the "
                                             "normal prior")
        super().__init__(z_dim)
        self.register_buffer("df", torch.full((z_dim,), df))

    def forward(self) -> dist.Distribution:
        return dist.StudentT(self.df, self.loc, self.scale).to_event(1)


#: Priors by config name.
PRIORS: dict[str, type[Prior]] = {
    "normal": StandardNormalPrior,
    "learned_normal": LearnedNormalPrior,
    "mog": MixtureOfGaussiansPrior,
    "vamp": VampPrior,
    "flow": FlowPrior,
    "laplace": LaplacePrior,
    "student_t": StudentTPrior,
}
