"""Every likelihood in the registry: shapes, support checks, samples against means, gradients; and
the distributions written here against direct computations.

Driven by ``LIKELIHOODS``: a new likelihood is tested here without editing this file.
"""

import math

import pytest
import torch

from helpers import data_of_kind, extreme_bernoulli_case
from pyrovae.likelihoods import (
    LIKELIHOODS, ContinuousBernoulliLikelihood, DataSupportError, DiscretizedLogisticLikelihood,
    DiscretizedLogisticMixture, LocationScaleLikelihood, NormalLikelihood,
)

NAMES = sorted(LIKELIHOODS)
IMAGE_SHAPE = (2, 3, 4)
#: Data kinds from the narrowest to the widest: binary images are 8-bit images are grey levels.
KINDS = ("binary", "8bit", "unit")



def make(name, shape=IMAGE_SHAPE, seed=0):
    """(likelihood, decoder outputs of the right shape for 4 images)."""
    torch.manual_seed(seed)
    lik = LIKELIHOODS[name].build(shape)
    outputs = torch.randn(4, lik.outputs_per_pixel * shape[0], *shape[1:])
    return lik, outputs


@pytest.mark.parametrize("name", NAMES)
def test_declares_a_known_data_kind(name):
    assert LIKELIHOODS[name].build(IMAGE_SHAPE).data_kind in KINDS


@pytest.mark.parametrize("name", NAMES)
def test_shapes_finite_log_prob_and_samples_in_the_support(name):
    lik, outputs = make(name)
    p = lik(outputs)
    assert p.batch_shape == (4,) and p.event_shape == IMAGE_SHAPE
    x = data_of_kind(lik.data_kind)
    lik.check(x)
    lp = p.log_prob(x)
    assert lp.shape == (4,) and torch.isfinite(lp).all()
    draws = p.sample()
    assert draws.shape == (4, *IMAGE_SHAPE)
    lik.check(draws)
    assert lik.mean(outputs).shape == (4, *IMAGE_SHAPE)


@pytest.mark.parametrize("name", NAMES)
def test_mean_is_the_average_of_draws(name):
    lik, outputs = make(name, shape=(1, 2, 2))
    with torch.no_grad():
        draws = lik(outputs).sample((20000,))  # (20000, 4, 1, 2, 2)
        mean = lik.mean(outputs)
    se = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - mean).abs() < 5 * se + 1e-4).all()


@pytest.mark.parametrize("name", NAMES)
def test_data_kinds_it_accepts_and_refuses(name):
    """Binary data fit every likelihood, 8-bit data those for 8-bit or grey levels; wider data are
    refused with a DataSupportError, and so are NaNs everywhere."""
    lik, _ = make(name)
    own = KINDS.index(lik.data_kind)
    for i, kind in enumerate(KINDS):
        x = data_of_kind(kind)
        if i <= own:
            lik.check(x)
        elif kind == "unit" and lik.data_kind == "8bit":
            with pytest.raises(DataSupportError, match=r"255"):
                lik.check(x)
        else:
            with pytest.raises(DataSupportError):
                lik.check(x)
    x = data_of_kind(lik.data_kind)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataSupportError):
        lik.check(x)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_outputs_and_the_likelihood_parameters(name):
    lik, outputs = make(name)
    outputs.requires_grad_(True)
    lik(outputs).log_prob(data_of_kind(lik.data_kind)).sum().backward()
    assert torch.isfinite(outputs.grad).all() and (outputs.grad != 0).any()
    for pname, param in lik.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {pname}"


@pytest.mark.parametrize("name", NAMES)
def test_moves_with_its_module_and_round_trips(name):
    a, outputs = make(name, seed=0)
    b, _ = make(name, seed=1)
    with torch.no_grad():
        for param in a.parameters():
            param.add_(0.5)
    b.load_state_dict(a.state_dict())
    x = data_of_kind(a.data_kind)
    assert torch.equal(a(outputs).log_prob(x), b(outputs).log_prob(x))
    a.double()
    assert a(outputs.double()).log_prob(x.double()).dtype == torch.float64


# --- the discretized logistic mixture ---------------------------------------------------------------
LEVELS = torch.arange(256, dtype=torch.float64) / 255


def _random_mixture(k, shape=(5,), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, k, generator=g, dtype=torch.float64)
    loc = 1.6 * torch.rand(*shape, k, generator=g, dtype=torch.float64) - 0.3  # some outside [0, 1]
    scale = torch.exp(torch.empty(*shape, k, dtype=torch.float64).uniform_(-9, 1, generator=g))
    return logits, loc, scale


def _all_levels_log_prob(d):
    """log p(v) for every level v: (256, *batch_shape)."""
    return d.log_prob(LEVELS.reshape(256, *([1] * len(d.batch_shape))))


@pytest.mark.parametrize("k", [1, 3])
def test_discretized_logistic_sums_to_one_over_the_256_levels(k):
    d = DiscretizedLogisticMixture(*_random_mixture(k))
    total = _all_levels_log_prob(d).exp().sum(0)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-10)


def test_discretized_logistic_sums_to_one_in_float32():
    logits, loc, scale = (t.float() for t in _random_mixture(4, shape=(200,), seed=1))
    d = DiscretizedLogisticMixture(logits, loc, scale)
    total = d.log_prob(LEVELS.float().reshape(256, 1)).exp().sum(0)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-5)


def test_discretized_logistic_matches_differences_of_the_logistic_cdf():
    _, loc, scale = _random_mixture(1)
    d = DiscretizedLogisticMixture(torch.zeros_like(loc), loc, scale)
    cdf = lambda t: torch.sigmoid((t - loc[:, 0]) / scale[:, 0])  # noqa: E731
    upper = torch.stack([cdf(v + 0.5 / 255) if v < 1 else torch.ones(5, dtype=torch.float64) for v in LEVELS])
    lower = torch.stack([cdf(v - 0.5 / 255) if v > 0 else torch.zeros(5, dtype=torch.float64) for v in LEVELS])
    direct = upper - lower  # (256, 5)
    probs = _all_levels_log_prob(d).exp()
    torch.testing.assert_close(probs, direct, rtol=1e-9, atol=1e-12)


def test_discretized_logistic_mixture_is_the_weighted_sum_of_its_components():
    logits, loc, scale = _random_mixture(3)
    mixture = _all_levels_log_prob(DiscretizedLogisticMixture(logits, loc, scale)).exp()
    weights = torch.softmax(logits, -1)
    parts = [_all_levels_log_prob(DiscretizedLogisticMixture(logits[:, i:i + 1], loc[:, i:i + 1],
                                                             scale[:, i:i + 1])).exp() for i in range(3)]
    torch.testing.assert_close(mixture, sum(weights[:, i] * parts[i] for i in range(3)))


def test_discretized_logistic_mean_is_the_sum_over_levels():
    d = DiscretizedLogisticMixture(*_random_mixture(3))
    direct = (LEVELS[:, None] * _all_levels_log_prob(d).exp()).sum(0)
    torch.testing.assert_close(d.mean, direct)


def test_discretized_logistic_stays_finite_for_extreme_parameters():
    loc = torch.tensor([[0.5], [-50.0], [50.0], [0.5]], requires_grad=True)
    scale = torch.tensor([[1e-4], [1e-4], [1e-4], [1e4]], requires_grad=True)
    d = DiscretizedLogisticMixture(torch.zeros(4, 1), loc, scale)
    lp = d.log_prob(torch.tensor([0.0, 1.0, 0.0, 128 / 255]))
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()


def test_discretized_logistic_likelihood_layout_and_bits_per_dim():
    """Outputs are (logits, locs, log-scales), each K blocks of C channels; -log p / (CHW ln 2) of
    data on which it is sharply peaked is near 0 bits per dimension."""
    lik = DiscretizedLogisticLikelihood(components=2)
    assert lik.outputs_per_pixel == 6
    x = data_of_kind("8bit", n=2)  # (2, 2, 3, 4)
    outputs = torch.zeros(2, 6 * 2, 3, 4)
    outputs[:, 4:8] = x.repeat(1, 2, 1, 1)  # both components centred on the data
    outputs[:, 8:12] = -20.0  # log-scales far below the clamp
    bits = -lik(outputs).log_prob(x) / (x[0].numel() * math.log(2))
    # at the clamped log-scale -8 an inner level holds 1 - 2 sigmoid(-5.85) = 99.4% of the mass
    assert (bits >= 0).all() and (bits < 0.0084).all()
    assert DiscretizedLogisticLikelihood(components=1).outputs_per_pixel == 2


def test_discretized_logistic_refuses_grey_levels_off_the_grid():
    with pytest.raises(DataSupportError, match=r"torch.round\(x \* 255\) / 255"):
        DiscretizedLogisticLikelihood().check(torch.full((1, 1, 2, 2), 0.3))


# --- the continuous Bernoulli ------------------------------------------------------------------------
def test_continuous_bernoulli_matches_its_closed_form():
    lik = ContinuousBernoulliLikelihood()
    logits = torch.tensor([-3.0, -0.7, 0.4, 2.5], dtype=torch.float64).reshape(1, 1, 2, 2)
    x = torch.tensor([0.1, 0.9, 0.0, 0.55], dtype=torch.float64).reshape(1, 1, 2, 2)
    lam = torch.sigmoid(logits)
    log_norm = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))
    direct = (log_norm + x * torch.log(lam) + (1 - x) * torch.log1p(-lam)).sum()
    torch.testing.assert_close(lik(logits).log_prob(x), direct.reshape(1))
    mean = lam / (2 * lam - 1) + 1 / (2 * torch.atanh(1 - 2 * lam))
    torch.testing.assert_close(lik.mean(logits), mean)
    assert not torch.allclose(lik.mean(logits), lam)


# --- normal and Laplace scales -----------------------------------------------------------------------
@pytest.mark.parametrize("scale", LocationScaleLikelihood.SCALES)
def test_normal_scale_options(scale):
    lik = NormalLikelihood(scale=scale, scale_value=0.2).double()
    assert lik.outputs_per_pixel == (2 if scale == "per_pixel" else 1)
    outputs = torch.randn(3, lik.outputs_per_pixel, 2, 2, dtype=torch.float64)
    x = data_of_kind("unit", n=3, shape=(1, 2, 2)).double()
    loc = outputs[:, :1]
    softplus = torch.nn.functional.softplus
    if scale == "learned":  # starts at scale_value (up to float32 rounding of the raw parameter)
        sigma = softplus(lik.raw_scale.detach()) + 1e-3
        assert abs(sigma.item() - 0.2) < 1e-6
    else:
        sigma = softplus(outputs[:, 1:]) + 1e-3 if scale == "per_pixel" else torch.tensor(0.2).double()
    direct = (-0.5 * ((x - loc) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum((1, 2, 3))
    torch.testing.assert_close(lik(outputs).log_prob(x), direct)
    assert len(list(lik.parameters())) == (1 if scale == "learned" else 0)
    torch.testing.assert_close(lik.mean(outputs), loc)


def test_laplace_matches_its_closed_form():
    lik = LIKELIHOODS["laplace"].build((1, 2, 2), scale="fixed", scale_value=0.3).double()
    outputs = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    x = data_of_kind("unit", n=3, shape=(1, 2, 2)).double()
    direct = (-(x - outputs).abs() / 0.3 - math.log(2 * 0.3)).sum((1, 2, 3))
    torch.testing.assert_close(lik(outputs).log_prob(x), direct)


@pytest.mark.parametrize("options,match", [({"scale": "global"}, "fixed, learned, per_pixel"),
                                           ({"scale": "learned", "scale_value": 1e-4}, "min_scale"),
                                           ({"scale": "fixed", "scale_value": 0.0}, "positive")])
def test_bad_scale_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        NormalLikelihood(**options)


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_method_is_the_distributions_log_prob_with_and_without_gradients(name):
    """``likelihood.log_prob(outputs, x)`` (the estimators' entry point) against the distribution's
    log_prob in float64, with x broadcast over a leading sample dimension."""
    lik, outputs = make(name)
    outputs = torch.stack([outputs, 3 * outputs, -2 * outputs])  # (3 samples, 4 images, ...)
    x = data_of_kind(lik.data_kind)
    reference = lik.double()(outputs.double()).log_prob(x.double())  # (3, 4)
    lik.float()
    with torch.no_grad():
        fast = lik.log_prob(outputs, x)
    assert fast.shape == (3, 4) and fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lik.log_prob(outputs, x), lik(outputs).log_prob(x), rtol=0, atol=0)  # with gradients


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 1, 127)], ids=["784", "3072", "prime-127"])
def test_bernoulli_log_prob_against_float64_at_extreme_logits(shape):
    """The Bernoulli log-density in float32 stays within float32 rounding of the float64 value,
    saturated logits included. (The estimator's faster form is tested in test_evaluate.py.)"""
    logits, x, lik, reference = extreme_bernoulli_case(shape)
    with torch.no_grad():
        ours = lik.log_prob(logits, x)
    scale = logits.abs().flatten(-3).sum(-1).double()  # float32 rounding grows with the size of the terms
    assert ((ours.double() - reference).abs() <= 1e-6 * scale + 1e-4).all()
