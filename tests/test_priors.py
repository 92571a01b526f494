"""Every prior in the registry: shapes, normalization, samples against the density, gradients, devices.

Driven by ``PRIORS``: a new prior is tested here without editing this file. Priors that take
``components`` are built with three of them to keep the tests quick.
"""

import math

import pytest
import torch

from helpers import grid_2d, ks_distance, small_options
from pyrovae.posteriors import POSTERIORS
from pyrovae.networks import MLPEncoder
import pyro.distributions as dist

from pyrovae.priors import (PRIORS, DiagonalNormalMixture, FlowPrior, MixtureOfGaussiansPrior, StudentTPrior,
                             VampPrior)

NAMES = sorted(PRIORS)
IMAGE_SHAPE = (1, 4, 4)



def make_prior(name, z_dim=3, seed=0, guide=None):
    """(prior, guide): the guide is the one a prior such as the VampPrior calls."""
    torch.manual_seed(seed)
    if guide is None:
        guide = POSTERIORS["diagonal"].build(MLPEncoder(IMAGE_SHAPE, z_dim, (16,)), z_dim)
    cls = PRIORS[name]
    prior = cls.build(z_dim, posterior=guide, image_shape=IMAGE_SHAPE, **small_options(cls))
    return prior, guide




@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_finite_log_prob(name):
    prior, _ = make_prior(name, z_dim=3)
    p = prior()
    assert p.batch_shape == () and p.event_shape == (3,)
    z = p.sample((5,))
    assert z.shape == (5, 3)
    for codes in (z, 2 * torch.randn(7, 3)):
        lp = p.log_prob(codes)
        assert lp.shape == codes.shape[:1] and torch.isfinite(lp).all()


@pytest.mark.parametrize("name", NAMES)
def test_density_is_normalized_and_draws_follow_it(name):
    """For z_dim = 2, on a grid over [-12, 12]^2: a Riemann sum of p(z) is 1, and the first
    coordinate of 4000 draws follows the marginal CDF of p(z) (Kolmogorov-Smirnov)."""
    prior, guide = make_prior(name, z_dim=2)
    prior.double(), guide.double()
    step = 0.06
    g, z = grid_2d(12.0, step)
    with torch.no_grad():
        p = prior()
        density = p.log_prob(z).exp().reshape(len(g), len(g))  # [i, j]: z_1 = g[i], z_2 = g[j]
        torch.manual_seed(1)
        draws = p.sample((4000,))
    # tolerance: the Student-t (df = 3) leaves 2.5e-3 outside the square, and a randomly initialized
    # spline flow has ridges that the midpoint rule resolves to a few 1e-3 at this step
    assert abs(density.sum().item() * step**2 - 1) < 1e-2
    # 1.63 / sqrt(4000) = 0.026 is the 1% critical value of the KS statistic
    assert ks_distance(draws[:, 0], g, density.sum(1) * step, step) < 0.026


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_prior_parameter(name):
    prior, _ = make_prior(name, z_dim=3)
    log_prob = prior().log_prob(torch.randn(16, 3)).sum()
    if not log_prob.requires_grad:  # a fixed prior: nothing to reach
        assert not list(prior.parameters())
        return
    log_prob.backward()
    for pname, param in prior.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"no gradient reaches {pname}"


@pytest.mark.parametrize("name", NAMES)
def test_moves_with_its_module(name):
    prior, guide = make_prior(name, z_dim=3)
    prior.double(), guide.double()
    p = prior()
    z = p.sample((4,))
    assert z.dtype == torch.float64
    assert p.log_prob(z).dtype == torch.float64
    for tensor in [*prior.parameters(), *prior.buffers()]:
        assert tensor.dtype == torch.float64 or not tensor.is_floating_point()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    a, guide = make_prior(name, z_dim=3, seed=0)
    b, _ = make_prior(name, z_dim=3, seed=1, guide=guide)
    b.load_state_dict(a.state_dict())
    z = torch.randn(6, 3)
    assert torch.equal(a().log_prob(z), b().log_prob(z))


# --- oracles for the priors written here -----------------------------------------------------------
def _log_normal(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)


def test_mixture_of_gaussians_matches_a_direct_computation():
    prior = MixtureOfGaussiansPrior(3, components=4).double()
    with torch.no_grad():
        prior.logits.copy_(torch.randn(4))
        prior.log_scale.copy_(0.3 * torch.randn(4, 3))
    z = torch.randn(5, 3, dtype=torch.float64)
    weights = torch.softmax(prior.logits, 0)
    direct = sum(weights[k] * _log_normal(z, prior.loc[k], prior.log_scale[k].exp()).exp() for k in range(4)).log()
    torch.testing.assert_close(prior().log_prob(z), direct)


def test_vamp_prior_is_the_mean_of_the_guide_posteriors_at_the_pseudo_inputs():
    prior, guide = make_prior("vamp", z_dim=3)
    prior.double(), guide.double()
    assert isinstance(prior, VampPrior)
    u = prior.pseudo_inputs
    assert u.shape == (3, *IMAGE_SHAPE) and ((u > 0) & (u < 1)).all()
    z = torch.randn(5, 3, dtype=torch.float64)
    loc, scale = guide.encoder(u)  # (3, z_dim) each
    direct = torch.stack([_log_normal(z, loc[k], scale[k]) for k in range(3)]).exp().mean(0).log()
    torch.testing.assert_close(prior().log_prob(z), direct)


def _reference_mixture(logits, loc, scale):
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))


def test_matmul_mixture_equals_mixture_same_family_in_float64():
    torch.manual_seed(0)
    logits, loc, scale = torch.randn(7, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64), \
        torch.rand(7, 5, dtype=torch.float64) + 0.1
    z = 2 * torch.randn(4, 3, 5, dtype=torch.float64)  # any leading shape
    mixture = DiagonalNormalMixture(logits, loc, scale)
    assert mixture.batch_shape == () and mixture.event_shape == (5,)
    torch.testing.assert_close(mixture.log_prob(z), _reference_mixture(logits, loc, scale).log_prob(z),
                               rtol=1e-12, atol=1e-12)


def test_matmul_mixture_keeps_float32_accuracy_with_tight_components():
    """Encoder posteriors are narrow (scale ~1e-2) and far from 0: the expanded square cancels badly in
    float32, which is why the products run in float64. Float32 inputs must still match float64 to
    float32 precision."""
    torch.manual_seed(1)
    loc = 5 + torch.randn(50, 40)
    scale = 0.01 + 0.02 * torch.rand(50, 40)
    logits = torch.zeros(50)
    z = loc[torch.randint(50, (300,))] + scale[:1] * torch.randn(300, 40)  # near a component
    got = DiagonalNormalMixture(logits, loc, scale).log_prob(z)
    exact = _reference_mixture(logits.double(), loc.double(), scale.double()).log_prob(z.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-4)


def test_matmul_mixture_gradients_match_mixture_same_family():
    torch.manual_seed(2)
    params = [torch.randn(4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
              torch.rand(4, 3, dtype=torch.float64) + 0.2]
    z = torch.randn(6, 3, dtype=torch.float64)
    grads = []
    for build in (DiagonalNormalMixture, _reference_mixture):
        leaves = [p.clone().requires_grad_() for p in params] + [z.clone().requires_grad_()]
        build(*leaves[:3]).log_prob(leaves[3]).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for mine, reference in zip(*grads):
        torch.testing.assert_close(mine, reference)


def test_matmul_mixture_samples_have_the_mixture_moments():
    torch.manual_seed(3)
    logits, loc, scale = torch.tensor([0.0, 1.0]), torch.tensor([[-2.0, 0.0], [3.0, 1.0]]), \
        torch.tensor([[0.5, 1.0], [1.0, 0.2]])
    z = DiagonalNormalMixture(logits, loc, scale).sample((200_000,))
    w = torch.softmax(logits, 0)
    mean = (w[:, None] * loc).sum(0)
    var = (w[:, None] * (scale**2 + loc**2)).sum(0) - mean**2
    assert z.shape == (200_000, 2)
    torch.testing.assert_close(z.mean(0), mean, atol=4 * (var / 200_000).sqrt().max().item(), rtol=0)
    torch.testing.assert_close(z.var(0), var, rtol=0.02, atol=0)


def test_matmul_mixture_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits \(K,\), loc and scale \(K, D\)"):
        DiagonalNormalMixture(torch.zeros(3), torch.zeros(4, 2), torch.ones(4, 2))


def test_vamp_prior_shares_the_guide_without_owning_it():
    prior, guide = make_prior("vamp", z_dim=3)
    assert [n for n, _ in prior.named_parameters()] == ["raw_pseudo_inputs"]
    assert prior.posterior is guide
    prior().log_prob(torch.randn(8, 3)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.parameters())


def test_flow_prior_is_a_change_of_variables():
    """log p(z) = log N(f(z); 0, I) + log |det df/dz|, with the Jacobian of f by autograd."""
    prior = FlowPrior(3, flows=2).double()
    z = torch.randn(4, 3, dtype=torch.float64)

    def to_base(v):
        for flow in prior.flows:
            v = flow(v)
        return v

    for i in range(4):
        jacobian = torch.autograd.functional.jacobian(to_base, z[i])
        eps = to_base(z[i])
        direct = _log_normal(eps, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
        direct = direct + torch.linalg.slogdet(jacobian).logabsdet
        torch.testing.assert_close(prior().log_prob(z[i]), direct)


def test_student_t_matches_its_closed_form():
    df = 4.5
    prior = StudentTPrior(2, df=df).double()
    z = 3 * torch.randn(6, 2, dtype=torch.float64)
    per_dim = (math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
               - (df + 1) / 2 * torch.log1p(z**2 / df))
    torch.testing.assert_close(prior().log_prob(z), per_dim.sum(-1))


def test_laplace_matches_its_closed_form():
    prior = PRIORS["laplace"](2).double()
    z = 3 * torch.randn(6, 2, dtype=torch.float64)
    torch.testing.assert_close(prior().log_prob(z), (-z.abs() - math.log(2)).sum(-1))


@pytest.mark.parametrize("cls", [MixtureOfGaussiansPrior, VampPrior, FlowPrior, StudentTPrior])
def test_nonsense_options_are_refused(cls):
    key = {MixtureOfGaussiansPrior: "components", VampPrior: "components", FlowPrior: "flows",
           StudentTPrior: "df"}[cls]
    guide = POSTERIORS["diagonal"].build(MLPEncoder(IMAGE_SHAPE, 2, (8,)), 2)
    with pytest.raises(ValueError, match=key):
        cls.build(2, posterior=guide, image_shape=IMAGE_SHAPE, **{key: 0})
