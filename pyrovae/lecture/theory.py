"""The information theory behind the ELBO, as small torch functions with the formula in each docstring.

Logarithms are natural (nats) unless ``base=2`` is given (bits). Discrete distributions are
probability vectors along the last dimension; leading dimensions are batch dimensions. Every
function follows the conventions the formulas need: 0 log 0 = 0, and KL(p||q) = inf where some
outcome has q = 0 < p.

    surprise(p)           I(p)     = -log p
    entropy(p)            H(p)     = -sum_i p_i log p_i
    cross_entropy(p, q)   H(p, q)  = -sum_i p_i log q_i              = H(p) + KL(p||q)
    kl_discrete(p, q)     KL(p||q) =  sum_i p_i log(p_i / q_i)       >= 0
    kl_gaussian           KL(N(mu0, S0) || N(mu1, S1)), full covariances, closed form
    kl_to_standard_normal KL(N(mu, diag sigma^2) || N(0, I)), the VAE's KL term
    reparameterize        z = mu + sigma * eps, eps ~ N(0, I)
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "surprise", "entropy", "cross_entropy", "kl_discrete",
    "kl_gaussian", "kl_diagonal_gaussian", "kl_to_standard_normal",
    "reparameterize", "reparameterized_gradients",
]


def _log(x: torch.Tensor, base: float) -> torch.Tensor:
    """log_base(x): nats for base e, bits for base 2."""
    return torch.log(x) if base == math.e else torch.log(x) / math.log(base)


def _as_tensor(p) -> torch.Tensor:
    p = torch.as_tensor(p)
    return p if p.is_floating_point() else p.to(torch.get_default_dtype())


def surprise(p, base: float = 2) -> torch.Tensor:
    """Self-information I(p) = -log_base p: 1 bit for p = 1/2, 0 for a sure event, inf for p = 0."""
    return -_log(_as_tensor(p), base) + 0.0  # + 0.0 turns the -0.0 of a sure event into 0.0


def entropy(probs, base: float = 2) -> torch.Tensor:
    """H(p) = -sum_i p_i log_base p_i over the last dimension, with 0 log 0 = 0.

    The expected surprise; the least average message length (in bits for base 2) of a code for p.
    """
    p = _as_tensor(probs)
    terms = torch.where(p > 0, -p * _log(torch.where(p > 0, p, 1.0), base), torch.zeros_like(p))
    return terms.sum(-1)


def cross_entropy(p, q, base: float = 2) -> torch.Tensor:
    """H(p, q) = -sum_i p_i log_base q_i: the average length of a code built for q, used on data from p.

    Terms with p_i = 0 count 0 (even where q_i = 0); a q_i = 0 < p_i makes it inf.
    """
    p, q = _as_tensor(p), _as_tensor(q)
    p, q = torch.broadcast_tensors(p, q)
    safe_q = torch.where(p > 0, q, torch.ones_like(q))
    terms = torch.where(p > 0, -p * _log(safe_q, base), torch.zeros_like(p))
    return terms.sum(-1)


def kl_discrete(p, q, base: float = 2) -> torch.Tensor:
    """KL(p||q) = sum_i p_i log_base(p_i / q_i) = H(p, q) - H(p) >= 0.

    The extra message length paid for coding p with a code built for q. Terms with p_i = 0 count 0;
    a q_i = 0 < p_i makes it inf; it is 0 exactly when p = q.
    """
    p, q = _as_tensor(p), _as_tensor(q)
    p, q = torch.broadcast_tensors(p, q)
    positive = p > 0
    safe_p = torch.where(positive, p, torch.ones_like(p))
    safe_q = torch.where(positive, q, torch.ones_like(q))
    terms = torch.where(positive, p * (_log(safe_p, base) - _log(safe_q, base)), torch.zeros_like(p))
    return terms.sum(-1)


def kl_gaussian(mu0: torch.Tensor, cov0: torch.Tensor, mu1: torch.Tensor, cov1: torch.Tensor) -> torch.Tensor:
    """KL(N(mu0, S0) || N(mu1, S1)) in nats, for k-dimensional Gaussians with full covariances::

        0.5 * ( tr(S1^-1 S0) + (mu1 - mu0)^T S1^-1 (mu1 - mu0) - k + log det S1 - log det S0 )

    Computed through Cholesky factors S = L L^T: with M = L1^-1 L0 (a triangular solve),
    tr(S1^-1 S0) = ||M||_F^2, the Mahalanobis term is ||L1^-1 (mu1 - mu0)||^2 and
    log det S = 2 sum log diag L; no inverse or determinant is formed. Shapes: means (..., k),
    covariances (..., k, k), broadcast together; the result has the batch shape (...).
    """
    k = mu0.shape[-1]
    l0 = torch.linalg.cholesky(cov0)
    l1 = torch.linalg.cholesky(cov1)
    batch = torch.broadcast_shapes(mu0.shape[:-1], mu1.shape[:-1], cov0.shape[:-2], cov1.shape[:-2])
    l0 = l0.expand(*batch, k, k)
    l1 = l1.expand(*batch, k, k)
    diff = (mu1 - mu0).expand(*batch, k).unsqueeze(-1)  # (..., k, 1)
    m = torch.linalg.solve_triangular(l1, l0, upper=False)  # (..., k, k) = L1^-1 L0
    y = torch.linalg.solve_triangular(l1, diff, upper=False).squeeze(-1)  # (..., k) = L1^-1 (mu1 - mu0)
    trace = m.pow(2).sum((-2, -1))
    mahalanobis = y.pow(2).sum(-1)
    logdet0 = 2 * torch.diagonal(l0, dim1=-2, dim2=-1).log().sum(-1)
    logdet1 = 2 * torch.diagonal(l1, dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + mahalanobis - k + logdet1 - logdet0)


def kl_diagonal_gaussian(mu0: torch.Tensor, sigma0: torch.Tensor, mu1: torch.Tensor,
                         sigma1: torch.Tensor) -> torch.Tensor:
    """KL(N(mu0, diag sigma0^2) || N(mu1, diag sigma1^2)) in nats, summed over the last dimension::

        sum_j [ log(sigma1_j / sigma0_j) + (sigma0_j^2 + (mu0_j - mu1_j)^2) / (2 sigma1_j^2) - 1/2 ]

    The diagonal case of :func:`kl_gaussian`; arguments are standard deviations, not variances.
    """
    ratio = (sigma0 / sigma1).pow(2)
    mahalanobis = ((mu0 - mu1) / sigma1).pow(2)
    return 0.5 * (ratio + mahalanobis - 1 - ratio.log()).sum(-1)


def kl_to_standard_normal(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) = 0.5 * sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2).

    The KL term of the VAE's ELBO for a diagonal Gaussian encoder and the standard normal prior
    (Kingma and Welling 2014, appendix B).
    """
    variance = sigma.pow(2)
    return 0.5 * (mu.pow(2) + variance - 1 - variance.log()).sum(-1)


def reparameterize(mu: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps: with eps ~ N(0, I), z ~ N(mu, diag sigma^2).

    The noise comes from outside, so z is a differentiable function of (mu, sigma):
    dz/dmu = 1 and dz/dsigma = eps, and Monte Carlo gradients of E_q[f(z)] flow through z.
    """
    return mu + sigma * eps


def reparameterized_gradients(f, mu: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor):
    """Monte Carlo gradients of E_{z ~ N(mu, sigma^2)}[f(z)] w.r.t. mu and sigma, by reparameterization.

    ``eps`` has shape (samples, *mu.shape); ``f`` maps z of that shape to values of shape (samples, ...),
    which are averaged over samples and summed. Returns (estimate, d/dmu, d/dsigma), detached.
    For f(z) = z^2 the exact values are mu^2 + sigma^2, 2 mu and 2 sigma.
    """
    mu = mu.detach().requires_grad_(True)
    sigma = sigma.detach().requires_grad_(True)
    z = reparameterize(mu, sigma, eps)  # (samples, *mu.shape)
    estimate = f(z).mean(0).sum()
    grad_mu, grad_sigma = torch.autograd.grad(estimate, (mu, sigma))
    return estimate.detach(), grad_mu, grad_sigma
