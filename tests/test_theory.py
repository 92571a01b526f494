"""The information-theory functions against closed forms, torch's own KL formulas and Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from pyrovae.lecture import theory


def random_covariance(k: int, generator: torch.Generator, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """A well-conditioned random SPD matrix (..., k, k)."""
    a = torch.randn(*batch, k, k, generator=generator, dtype=torch.float64)
    return a @ a.transpose(-1, -2) / k + 0.5 * torch.eye(k, dtype=torch.float64)


def random_gaussian(k: int, generator: torch.Generator, batch: tuple[int, ...] = ()):
    loc = torch.randn(*batch, k, generator=generator, dtype=torch.float64)
    return loc, random_covariance(k, generator, batch)


def random_probs(n: int, generator: torch.Generator, batch: tuple[int, ...] = ()) -> torch.Tensor:
    return torch.rand(*batch, n, generator=generator, dtype=torch.float64).add(0.01).softmax(-1)


# --- surprise, entropy, cross-entropy, discrete KL ----------------------------------------------
def test_surprise_of_a_fair_coin_is_one_bit():
    assert theory.surprise(0.5).item() == 1.0
    assert theory.surprise(0.25).item() == 2.0
    assert theory.surprise(1.0).item() == 0.0
    assert theory.surprise(0.5, base=math.e).item() == pytest.approx(math.log(2))
    assert theory.surprise(0.0).item() == math.inf


def test_surprise_decreases_with_probability():
    p = torch.linspace(0.01, 1, 100, dtype=torch.float64)
    assert (theory.surprise(p).diff() < 0).all()


def test_message_length_example_has_entropy_one_and_a_half_bits():
    # P(a) = P(b) = 1/4, P(c) = 1/2: codes 10, 11, 0 have lengths 2, 2, 1 and average 1.5 bits
    probs = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    code_lengths = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    assert theory.entropy(probs).item() == 1.5
    assert (probs * code_lengths).sum().item() == theory.entropy(probs).item()
    assert torch.equal(theory.surprise(probs), code_lengths)


def test_coin_entropy_is_largest_at_one_half_with_value_one_bit():
    p = torch.linspace(0, 1, 1001, dtype=torch.float64)
    h = theory.entropy(torch.stack([p, 1 - p], dim=-1))
    assert h[500].item() == 1.0
    assert h.argmax().item() == 500
    assert h[0].item() == 0.0 and h[-1].item() == 0.0  # 0 log 0 = 0: a sure coin carries no information
    assert torch.allclose(h, h.flip(0))


def test_entropy_of_uniform_is_log_n_and_bounds_every_other():
    generator = torch.Generator().manual_seed(0)
    for n in (2, 3, 8, 10):
        uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
        assert theory.entropy(uniform).item() == pytest.approx(math.log2(n), abs=1e-12)
        assert theory.entropy(uniform, base=math.e).item() == pytest.approx(math.log(n), abs=1e-12)
        assert (theory.entropy(random_probs(n, generator, (50,))) <= math.log2(n) + 1e-12).all()


def test_entropy_matches_torch_categorical():
    generator = torch.Generator().manual_seed(1)
    probs = random_probs(6, generator, (20,))
    expected = torch.distributions.Categorical(probs=probs).entropy()
    assert torch.allclose(theory.entropy(probs, base=math.e), expected, atol=1e-12)


def test_cross_entropy_is_entropy_plus_kl():
    generator = torch.Generator().manual_seed(2)
    p, q = random_probs(7, generator, (30,)), random_probs(7, generator, (30,))
    for base in (2, math.e):
        lhs = theory.cross_entropy(p, q, base)
        rhs = theory.entropy(p, base) + theory.kl_discrete(p, q, base)
        assert torch.allclose(lhs, rhs, atol=1e-12)
    assert (theory.cross_entropy(p, q) >= theory.entropy(p)).all()


def test_discrete_kl_is_nonnegative_zero_on_equality_and_asymmetric():
    generator = torch.Generator().manual_seed(3)
    p, q = random_probs(5, generator, (200,)), random_probs(5, generator, (200,))
    assert (theory.kl_discrete(p, q) > 0).all()
    assert (theory.kl_discrete(p, p) == 0).all()
    assert not torch.allclose(theory.kl_discrete(p, q), theory.kl_discrete(q, p))
    expected = kl_divergence(torch.distributions.Categorical(probs=p), torch.distributions.Categorical(probs=q))
    assert torch.allclose(theory.kl_discrete(p, q, base=math.e), expected, atol=1e-12)


def test_discrete_kl_handles_zeros():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    assert theory.kl_discrete(p, q).item() == 1.0  # terms with p = 0 count 0
    assert theory.kl_discrete(q, p).item() == math.inf  # q puts mass where p has none
    assert theory.cross_entropy(q, p).item() == math.inf
    assert theory.entropy(p).item() == 1.0


# --- Gaussian KL ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_kl_gaussian_matches_torch_multivariate_normal(k):
    generator = torch.Generator().manual_seed(10 + k)
    mu0, cov0 = random_gaussian(k, generator, (25,))
    mu1, cov1 = random_gaussian(k, generator, (25,))
    ours = theory.kl_gaussian(mu0, cov0, mu1, cov1)
    expected = kl_divergence(MultivariateNormal(mu0, cov0), MultivariateNormal(mu1, cov1))
    assert ours.shape == (25,)
    assert torch.allclose(ours, expected, rtol=1e-10, atol=1e-10)
    assert (ours > 0).all()


def test_kl_gaussian_broadcasts_one_distribution_against_a_batch():
    generator = torch.Generator().manual_seed(20)
    mu0, cov0 = random_gaussian(3, generator, (8,))
    mu1, cov1 = random_gaussian(3, generator)
    ours = theory.kl_gaussian(mu0, cov0, mu1, cov1)
    expected = torch.stack([theory.kl_gaussian(mu0[i], cov0[i], mu1, cov1) for i in range(8)])
    assert ours.shape == (8,)
    assert torch.allclose(ours, expected, atol=1e-12)


def test_kl_gaussian_is_zero_for_equal_distributions():
    generator = torch.Generator().manual_seed(21)
    mu, cov = random_gaussian(6, generator, (10,))
    assert torch.allclose(theory.kl_gaussian(mu, cov, mu, cov), torch.zeros(10, dtype=torch.float64), atol=1e-12)
    sigma = torch.rand(10, 6, generator=generator, dtype=torch.float64) + 0.1
    assert (theory.kl_diagonal_gaussian(mu, sigma, mu, sigma) == 0).all()
    assert (theory.kl_to_standard_normal(torch.zeros(4), torch.ones(4)) == 0).all()


def test_kl_gaussian_is_asymmetric():
    mu = torch.zeros(1, dtype=torch.float64)
    narrow, wide = 0.25 * torch.eye(1, dtype=torch.float64), 4 * torch.eye(1, dtype=torch.float64)
    forward, backward = theory.kl_gaussian(mu, narrow, mu, wide), theory.kl_gaussian(mu, wide, mu, narrow)
    # KL(N(0, a) || N(0, b)) = 0.5 * (a/b - 1 - log(a/b))
    assert forward.item() == pytest.approx(0.5 * (1 / 16 - 1 + math.log(16)), rel=1e-12)
    assert backward.item() == pytest.approx(0.5 * (16 - 1 - math.log(16)), rel=1e-12)
    assert backward > 3 * forward


def test_kl_gaussian_is_nonnegative_on_random_cases():
    generator = torch.Generator().manual_seed(22)
    for k in (1, 3, 8):
        mu0, cov0 = random_gaussian(k, generator, (500,))
        mu1, cov1 = random_gaussian(k, generator, (500,))
        assert (theory.kl_gaussian(mu0, cov0, mu1, cov1) >= 0).all()
        sigma0 = torch.rand(500, k, generator=generator, dtype=torch.float64) * 3 + 0.05
        sigma1 = torch.rand(500, k, generator=generator, dtype=torch.float64) * 3 + 0.05
        assert (theory.kl_diagonal_gaussian(mu0, sigma0, mu1, sigma1) >= 0).all()


@pytest.mark.parametrize("k", [1, 4, 50])
def test_kl_diagonal_gaussian_matches_torch_and_the_full_formula(k):
    generator = torch.Generator().manual_seed(30 + k)
    mu0, mu1 = torch.randn(2, 16, k, generator=generator, dtype=torch.float64)
    sigma0, sigma1 = torch.rand(2, 16, k, generator=generator, dtype=torch.float64) * 2 + 0.1
    ours = theory.kl_diagonal_gaussian(mu0, sigma0, mu1, sigma1)
    expected = kl_divergence(Independent(Normal(mu0, sigma0), 1), Independent(Normal(mu1, sigma1), 1))
    assert torch.allclose(ours, expected, rtol=1e-10, atol=1e-12)
    full = theory.kl_gaussian(mu0, torch.diag_embed(sigma0**2), mu1, torch.diag_embed(sigma1**2))
    assert torch.allclose(ours, full, rtol=1e-10, atol=1e-12)


def test_kl_to_standard_normal_is_the_diagonal_case():
    generator = torch.Generator().manual_seed(40)
    mu = torch.randn(32, 50, generator=generator, dtype=torch.float64)
    sigma = torch.rand(32, 50, generator=generator, dtype=torch.float64) + 0.01
    ours = theory.kl_to_standard_normal(mu, sigma)
    expected = theory.kl_diagonal_gaussian(mu, sigma, torch.zeros_like(mu), torch.ones_like(sigma))
    assert torch.allclose(ours, expected, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3])
def test_kl_gaussian_agrees_with_monte_carlo(k):
    # KL(p0||p1) = E_{z ~ p0}[log p0(z) - log p1(z)], estimated from n draws, within 4 standard errors
    generator = torch.Generator().manual_seed(50 + k)
    mu0, cov0 = random_gaussian(k, generator)
    mu1, cov1 = random_gaussian(k, generator)
    p0, p1 = MultivariateNormal(mu0, cov0), MultivariateNormal(mu1, cov1)
    n = 200_000
    eps = torch.randn(n, k, generator=generator, dtype=torch.float64)
    z = mu0 + eps @ torch.linalg.cholesky(cov0).T  # (n, k) draws from p0
    log_ratio = p0.log_prob(z) - p1.log_prob(z)  # (n,)
    estimate, standard_error = log_ratio.mean(), log_ratio.std() / math.sqrt(n)
    exact = theory.kl_gaussian(mu0, cov0, mu1, cov1)
    assert abs(estimate - exact) < 4 * standard_error


# --- reparameterization --------------------------------------------------------------------------
def test_reparameterize_has_the_right_mean_and_variance():
    generator = torch.Generator().manual_seed(60)
    mu = torch.tensor([-1.0, 0.0, 2.5], dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    n = 400_000
    z = theory.reparameterize(mu, sigma, torch.randn(n, 3, generator=generator, dtype=torch.float64))
    # standard errors: sigma / sqrt(n) for the mean, about sigma^2 sqrt(2 / n) for the variance
    assert ((z.mean(0) - mu).abs() < 4 * sigma / math.sqrt(n)).all()
    assert ((z.var(0) - sigma**2).abs() < 4 * sigma**2 * math.sqrt(2 / n)).all()


def test_reparameterize_passes_gradients_to_mu_and_sigma():
    mu = torch.tensor([0.3, -0.7], requires_grad=True)
    sigma = torch.tensor([1.5, 0.2], requires_grad=True)
    eps = torch.tensor([[0.5, -2.0], [1.0, 3.0]])
    z = theory.reparameterize(mu, sigma, eps)
    z.sum().backward()
    assert torch.equal(mu.grad, torch.tensor([2.0, 2.0]))  # dz/dmu = 1 per draw
    assert torch.equal(sigma.grad, eps.sum(0))  # dz/dsigma = eps


def test_reparameterized_gradients_of_a_quadratic():
    # E[z^2] = mu^2 + sigma^2: gradients 2 mu and 2 sigma, estimated within 4 standard errors
    generator = torch.Generator().manual_seed(61)
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    sigma = torch.tensor([2.0, 0.3], dtype=torch.float64)
    n = 200_000
    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    value, grad_mu, grad_sigma = theory.reparameterized_gradients(lambda z: z.pow(2), mu, sigma, eps)
    # per-draw gradients are 2 z (w.r.t. mu) and 2 z eps (w.r.t. sigma)
    z = mu + sigma * eps
    se_mu = (2 * z).std(0) / math.sqrt(n)
    se_sigma = (2 * z * eps).std(0) / math.sqrt(n)
    assert ((grad_mu - 2 * mu).abs() < 4 * se_mu).all()
    assert ((grad_sigma - 2 * sigma).abs() < 4 * se_sigma).all()
    assert abs(value - (mu**2 + sigma**2).sum()) < 4 * (z.pow(2).sum(-1).std() / math.sqrt(n))
