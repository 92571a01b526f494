"""Probabilistic PCA: a linear-Gaussian VAE in which every quantity of variational inference is exact.

Generative story (Tipping and Bishop 1999), for each data point n::

    z_n ~ N(0, I_k)
    x_n ~ N(W z_n + b, s^2 I_d)

Everything the VAE can only estimate has a closed form here:

    marginal      p(x)   = N(x; b, C),                C = W W^T + s^2 I_d
    posterior     p(z|x) = N(z; M^-1 W^T (x - b), s^2 M^-1),  M = W^T W + s^2 I_k
    ELBO(q)       E_q[log p(x|z)] + E_q[log p(z)] + H(q)  for any Gaussian q(z) = N(m, S)
    identity      log p(x) - ELBO(q) = KL(q || p(z|x))
    optimum       the maximum-likelihood (b, W, s^2), from the eigen-decomposition of the sample covariance

:class:`LinearGaussian` holds one set of parameters and computes these; :func:`maximum_likelihood`
finds the optimum; :class:`PPCA` is the same model as a Pyro model/guide pair with an amortized
linear Gaussian guide q(z|x) = N(A x + c, L L^T), trainable with ``Trace_ELBO`` and a torch
optimizer. Its parameters belong to the module; Pyro's global parameter store is never used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearGaussian", "maximum_likelihood", "PPCA", "GUIDE_COVARIANCES"]

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class LinearGaussian:
    """The parameters of p(z) = N(0, I_k), p(x|z) = N(W z + b, s^2 I_d), and their closed forms.

    Gradients flow through every method, so the closed forms can also be optimized directly.
    """

    weight: torch.Tensor  # W: (d, k) factor loadings
    bias: torch.Tensor  # b: (d,) the mean of x
    noise_scale: torch.Tensor  # s: () standard deviation of the isotropic observation noise

    @property
    def data_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def noise_var(self) -> torch.Tensor:
        return self.noise_scale.pow(2)

    # --- the marginal p(x) --------------------------------------------------------------------
    def marginal_covariance(self) -> torch.Tensor:
        """C = W W^T + s^2 I_d: (d, d)."""
        eye = torch.eye(self.data_dim, dtype=self.weight.dtype, device=self.weight.device)
        return self.weight @ self.weight.T + self.noise_var * eye

    def marginal(self) -> dist.MultivariateNormal:
        """p(x) = N(b, W W^T + s^2 I_d), as a distribution object."""
        return dist.MultivariateNormal(self.bias, covariance_matrix=self.marginal_covariance())

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = -0.5 * (d log 2pi + log det C + (x - b)^T C^-1 (x - b)), per row of x (..., d)."""
        chol = torch.linalg.cholesky(self.marginal_covariance())  # (d, d)
        centered = (x - self.bias).unsqueeze(-1)  # (..., d, 1)
        white = torch.linalg.solve_triangular(chol, centered, upper=False).squeeze(-1)  # (..., d)
        logdet = 2 * torch.diagonal(chol).log().sum()
        return -0.5 * (self.data_dim * LOG_2PI + logdet + white.pow(2).sum(-1))

    # --- the posterior p(z|x) -----------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (..., k) and covariance (k, k) of p(z|x): M^-1 W^T (x - b) and s^2 M^-1.

        The covariance does not depend on x; the mean is linear in x.
        """
        eye = torch.eye(self.latent_dim, dtype=self.weight.dtype, device=self.weight.device)
        m = self.weight.T @ self.weight + self.noise_var * eye  # (k, k)
        chol = torch.linalg.cholesky(m)
        loc = torch.cholesky_solve(self.weight.T @ (x - self.bias).unsqueeze(-1), chol).squeeze(-1)
        cov = self.noise_var * torch.cholesky_inverse(chol)
        return loc, cov

    # --- the ELBO of a Gaussian q(z) ----------------------------------------------------------
    def elbo(self, x: torch.Tensor, q_loc: torch.Tensor, q_cov: torch.Tensor,
             diagonal: bool = False) -> torch.Tensor:
        """ELBO(q) = E_q[log p(x|z)] + E_q[log p(z)] + H(q) for q(z) = N(m, S), exactly, per row of x.

        ``q_loc`` is m (..., k); ``q_cov`` is S (..., k, k), or with ``diagonal=True`` its diagonal
        (..., k) of variances. With r = x - b - W m the three terms are::

            E_q[log p(x|z)] = -0.5 * (d log(2pi s^2) + (|r|^2 + tr(W S W^T)) / s^2)
            E_q[log p(z)]   = -0.5 * (k log 2pi + |m|^2 + tr S)
            H(q)            =  0.5 * (k log(2pi e) + log det S)
        """
        d, k = self.data_dim, self.latent_dim
        if diagonal:
            q_cov = torch.diag_embed(q_cov)
        residual = x - self.bias - q_loc @ self.weight.T  # (..., d)
        spread = torch.einsum("ij,...jl,il->...", self.weight, q_cov, self.weight)  # tr(W S W^T), (...)
        expected_log_likelihood = -0.5 * (d * (LOG_2PI + self.noise_var.log())
                                          + (residual.pow(2).sum(-1) + spread) / self.noise_var)
        trace = torch.diagonal(q_cov, dim1=-2, dim2=-1).sum(-1)
        expected_log_prior = -0.5 * (k * LOG_2PI + q_loc.pow(2).sum(-1) + trace)
        logdet = 2 * torch.diagonal(torch.linalg.cholesky(q_cov), dim1=-2, dim2=-1).log().sum(-1)
        entropy = 0.5 * (k * (LOG_2PI + 1) + logdet)
        return expected_log_likelihood + expected_log_prior + entropy

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x from the generative story: (n, d)."""
        options = {"dtype": self.weight.dtype, "device": self.weight.device, "generator": generator}
        z = torch.randn(n, self.latent_dim, **options)
        noise = torch.randn(n, self.data_dim, **options)
        return z @ self.weight.T + self.bias + self.noise_scale * noise


def maximum_likelihood(x: torch.Tensor, latent_dim: int) -> tuple[LinearGaussian, torch.Tensor]:
    """The maximum-likelihood PPCA fit of data x (n, d) and its average log-likelihood per point.

    Tipping and Bishop (1999), with sample covariance S = (1/n) sum (x - mean)(x - mean)^T having
    eigenvalues l_1 >= ... >= l_d and eigenvectors U::

        b    = sample mean
        s^2  = mean of the d - k smallest eigenvalues
        W    = U_k (diag(l_1..l_k) - s^2 I)^(1/2)        (up to a rotation on the right)
        (1/n) log p(X) = -0.5 * (d log 2pi + sum_{j<=k} log l_j + (d - k) log s^2 + d)
    """
    n, d = x.shape
    k = latent_dim
    if not 0 < k < d:
        raise ValueError(f"the latent dimension must be between 1 and d - 1 = {d - 1}, got {k}")
    bias = x.mean(0)
    centered = x - bias
    covariance = centered.T @ centered / n  # (d, d)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    noise_var = eigenvalues[k:].mean()
    weight = eigenvectors[:, :k] * (eigenvalues[:k] - noise_var).clamp_min(0).sqrt()
    params = LinearGaussian(weight, bias, noise_var.sqrt())
    average = -0.5 * (d * LOG_2PI + eigenvalues[:k].log().sum() + (d - k) * noise_var.log() + d)
    return params, average


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


#: Forms of the guide's covariance: "full" can equal the exact posterior for any W, "diagonal" only
#: where W^T W is diagonal (which includes a maximum-likelihood W, Lucas et al. 2019).
GUIDE_COVARIANCES = ("full", "diagonal")


class PPCA(nn.Module):
    """PPCA as a Pyro model/guide pair, with every parameter owned by this module.

    Model::

        z_n ~ N(0, I_k)
        x_n ~ N(W z_n + b, s^2 I_d)

    Guide (amortized, linear, its covariance shared by all x as in the exact posterior)::

        z_n ~ q(z | x_n) = N(A x_n + c, L L^T)

    where L = diag(softplus(r)) for ``covariance="diagonal"``, or lower triangular with diagonal
    softplus(r) and free entries below it for ``covariance="full"``. Train with
    ``pyro.infer.Trace_ELBO().differentiable_loss(ppca.model, ppca.guide, x)`` and any torch optimizer
    over ``ppca.parameters()``.
    """

    def __init__(self, data_dim: int, latent_dim: int, covariance: str = "full", init_scale: float = 0.1,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if covariance not in GUIDE_COVARIANCES:
            raise ValueError(f"unknown guide covariance {covariance!r}; valid: {', '.join(GUIDE_COVARIANCES)}")
        d, k = data_dim, latent_dim
        options = {"generator": generator, "dtype": dtype}
        # model p: W, b, s = exp(log_noise_scale)
        self.weight = nn.Parameter(init_scale * torch.randn(d, k, **options))
        self.bias = nn.Parameter(torch.zeros(d, dtype=dtype))
        self.log_noise_scale = nn.Parameter(torch.zeros((), dtype=dtype))
        # guide q: A, c, and the Cholesky factor L of the shared covariance
        self.encoder_weight = nn.Parameter(init_scale * torch.randn(k, d, **options))
        self.encoder_bias = nn.Parameter(torch.zeros(k, dtype=dtype))
        self.raw_scale = nn.Parameter(torch.full((k,), _inverse_softplus(1.0), dtype=dtype))
        self.covariance = covariance
        if covariance == "full":
            self.scale_offdiag = nn.Parameter(torch.zeros(k, k, dtype=dtype))

    @property
    def latent_dim(self) -> int:
        return self.weight.shape[1]

    def params(self) -> LinearGaussian:
        """The model's current parameters, for the closed forms (gradients flow through them)."""
        return LinearGaussian(self.weight, self.bias, self.log_noise_scale.exp())

    def guide_scale_tril(self) -> torch.Tensor:
        """L: (k, k) lower triangular with a positive diagonal; q's covariance is L L^T."""
        diag = torch.diag_embed(F.softplus(self.raw_scale))
        if self.covariance == "full":
            return diag + torch.tril(self.scale_offdiag, diagonal=-1)
        return diag

    def guide_loc(self, x: torch.Tensor) -> torch.Tensor:
        """A x + c: (batch, k)."""
        return x @ self.encoder_weight.T + self.encoder_bias

    def model(self, x: torch.Tensor) -> None:
        """p(x, z) = N(z; 0, I) N(x; W z + b, s^2 I); ``x`` of shape (batch, d) is observed."""
        zeros = x.new_zeros(self.latent_dim)
        noise_scale = self.log_noise_scale.exp()
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))  # (batch, k)
            mean = z @ self.weight.T + self.bias  # (batch, d)
            pyro.sample("x", dist.Normal(mean, noise_scale).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """q(z|x) = N(A x + c, L L^T)."""
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(self.guide_loc(x), scale_tril=self.guide_scale_tril()))

    def closed_form_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """The exact ELBO of the current guide, per row of x (batch,)."""
        scale_tril = self.guide_scale_tril()
        return self.params().elbo(x, self.guide_loc(x), scale_tril @ scale_tril.T)
