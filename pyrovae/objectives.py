"""Training objectives as loss modules: ``loss(x)`` is the negative ELBO summed over the batch.

One training loop trains any of them (``pyrovae.engine.fit``), each called as ``loss(x, kl_weight=beta)``: Pyro's estimators around a VAE's
model/guide pair, the same estimators scored from Pyro's traces without reading a value back from the
device (:class:`TracedELBO`), and the hand-coded ELBO of :mod:`pyrovae.elbo_manual`.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import MultiFrameTensor, is_validation_enabled
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match
from torch import nn
from torch.distributions import kl_divergence

from pyrovae.config import OLD_NAMES, ConfigError
from pyrovae.elbo_manual import ManualELBO, ManualIWAE

__all__ = ["OBJECTIVES", "ESTIMATORS", "IMPLEMENTATIONS", "OLD_NAMES", "PyroELBO", "PyroIWAE", "PyroDReG", "TracedELBO",
           "build_objective", "check_objective", "resolve_objective"]


class PyroELBO(nn.Module):
    """-ELBO of ``vae.model``/``vae.guide`` by a Pyro estimator (``Trace_ELBO`` by default).

    The module owns the VAE, so ``loss.parameters()`` are exactly the VAE's parameters.
    """

    def __init__(self, vae: nn.Module, elbo: ELBO | None = None):
        super().__init__()
        self.vae = vae
        self.elbo = elbo if elbo is not None else Trace_ELBO()
        if isinstance(self.elbo, TraceMeanField_ELBO) and getattr(vae, "inference", None) == "bottom_up":
            raise ValueError("Pyro's TraceMeanField_ELBO takes each layer's KL in closed form, which is biased under "
                             "a bottom-up guide (q draws z1 before z2, and p(z1 | z2) depends on z2); use the "
                             "objective meanfield (ours: closed form only where it is valid) or trace_elbo")
        # bound once: `vae.model` is a new object at every access, and Pyro's JIT caches by identity
        self._model, self._guide = vae.model, vae.guide

    def forward(self, x: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        return self.elbo.differentiable_loss(self._model, self._guide, x, kl_weight=kl_weight)


class PyroIWAE(nn.Module):
    """-IWAE_K summed over the batch, from Pyro traces of ``vae.model``/``vae.guide``.

    The guide runs inside a plate of K particles (dim -2, outside the data plate), the model is
    replayed against it, and the per-image log weights log p(x, z_k) - log q(z_k|x) of each particle
    are averaged in probability space. (Pyro's ``RenyiELBO(alpha=0)`` estimates the same bound but
    has no differentiable loss to hand to a torch optimizer.)
    """

    def __init__(self, vae: nn.Module, particles: int = 5):
        super().__init__()
        if not isinstance(particles, int) or particles < 1:
            raise ValueError(f"the IWAE bound needs K >= 1 particles, got {particles!r}")
        self.vae, self.particles = vae, particles
        self._model, self._guide = vae.model, vae.guide

    def _vectorized(self, fn):
        def run(x, kl_weight):
            with pyro.plate("particles", self.particles, dim=-2):
                return fn(x, kl_weight=kl_weight)
        return run

    def forward(self, x: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        guide_trace = poutine.trace(self._vectorized(self._guide)).get_trace(x, kl_weight)
        model_trace = poutine.trace(poutine.replay(self._vectorized(self._model), trace=guide_trace)).get_trace(
            x, kl_weight)
        log_w = 0.0
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            trace.compute_log_prob()
            for site in trace.nodes.values():
                if site["type"] == "sample" and not site_is_subsample(site):
                    log_w = log_w + sign * site["log_prob"]  # (K, batch)
        return -(torch.logsumexp(log_w, 0) - math.log(self.particles)).sum()


class _ScaleGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the incoming gradient by ``holder[0]``, a tensor set
    after the forward pass (the normalized importance weights, known only once log w is)."""

    @staticmethod
    def forward(ctx, value, holder):
        ctx.holder = holder
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        weights = ctx.holder[0]  # (K, batch)
        return grad * weights.reshape(weights.shape + (1,) * (grad.dim() - weights.dim())), None


class _HeldGuide(nn.Module):
    """The guide replayed on given values, for :func:`torch.func.functional_call` with its parameters detached."""

    def __init__(self, vae: nn.Module, vectorized):
        super().__init__()
        self.vae, self._vectorized = vae, vectorized

    def forward(self, values_trace, x, kl_weight):
        return poutine.trace(poutine.replay(self._vectorized(self.vae.guide), trace=values_trace)).get_trace(
            x, kl_weight)


class PyroDReG(PyroIWAE):
    """-IWAE_K with doubly reparameterized gradients (DReG, Tucker et al. 2019), from Pyro traces.

    The value is the IWAE bound's. The gradients: for the model's parameters, the IWAE gradient
    sum_k w_k grad log w_k (w_k the normalized weights); for the guide's,

        sum_k w_k^2 (d log w_k / d z_k) (d z_k / d phi),

    with log q(z_k|x) differentiated through z_k only, its parameters held (Eq. 7 of the paper). Its
    expectation is the IWAE gradient's, and its variance stays bounded as K grows, where the IWAE
    estimator's signal-to-noise ratio for the guide falls as 1/sqrt(K) (Rainforth et al. 2018).

    Here: the guide is traced (K particles, as :class:`PyroIWAE`); each latent value passes through
    an identity whose backward multiplies by w_k; log q is the guide replayed on those values under
    ``functional_call`` with detached parameters, and log p the model replayed on them. Every guide
    site must be reparameterized. Parameters the guide shares with the model (the top-down stack's
    conditionals, the VampPrior's encoder) take the IWAE gradient where they enter log p and the DReG
    one through z. The backward reads a tensor set after the forward pass. A trace of the loss alone
    would not see it (its backward is derived from the forward operations), but a trace of the whole
    step, forward and backward together, records the rescaling as it runs: the compiled whole step
    takes this objective, and the loss alone is never traced (``whole_step_only``).
    """

    whole_step_only = ("doubly reparameterized gradients rescale the gradient at each z by weights set after the "
                       "forward pass, which only a trace of the whole step sees")

    def __init__(self, vae: nn.Module, particles: int = 5):
        super().__init__(vae, particles)
        self._held = _HeldGuide(vae, self._vectorized)

    def forward(self, x: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        guide_trace = poutine.trace(self._vectorized(self._guide)).get_trace(x, kl_weight)
        holder = []
        for name, site in _sample_sites(guide_trace).items():
            if not site["fn"].has_rsample:
                raise NotImplementedError(f"doubly reparameterized gradients need a reparameterized guide; site "
                                          f"{name!r} is {type(site['fn']).__name__}")
            site["value"] = _ScaleGradient.apply(site["value"], holder)
        held = {name: p.detach().requires_grad_() for name, p in self._held.named_parameters()}  # fresh leaves
        q_trace = torch.func.functional_call(self._held, held, (guide_trace, x, kl_weight))
        model_trace = poutine.trace(poutine.replay(self._vectorized(self._model), trace=guide_trace)).get_trace(
            x, kl_weight)
        log_w = 0.0
        for name, site in _sample_sites(model_trace).items():
            log_w = log_w + _log_prob(site)  # (K, batch)
        for name, site in _sample_sites(q_trace).items():
            log_w = log_w - _log_prob(site)
        holder.append(torch.softmax(log_w.detach(), 0))
        return -(torch.logsumexp(log_w, 0) - math.log(self.particles)).sum()


class TracedELBO(nn.Module):
    """-ELBO of ``vae.model``/``vae.guide`` from Pyro's traces, with no value read back from the device.

    The guide is traced, the model is replayed against its draws (one particle), and every sample
    site is scored with ``site["fn"].log_prob(site["value"])``, scaled by the site's ``scale`` and
    masked by its ``mask`` as Pyro does (``kl_weight`` reaches the loss this way: the VAE scales its
    latent site in model and guide). Nothing here branches on a tensor's value or warns on a NaN: a
    non-finite loss is left to the training step's on-device guard.

    ``kl="mc"`` is the estimator of Pyro's ``Trace_ELBO``::

        ELBO = sum_model log p(site) - sum_guide log q(site)

    with every log density from the one draw. Guide sites that cannot be reparameterized add
    ``Trace_ELBO``'s score-function term (weighted by the log ratio log p - log q of the sites in the
    same plates), which carries gradient but no value.

    ``kl="analytic"`` is the estimator of Pyro's ``TraceMeanField_ELBO``: each latent site of the
    model must be a site of the guide too, and contributes -KL(q || p) in closed form where torch has
    one (scaled and masked by the guide site's) and the guide drew every latent that comes before the
    site in the model first, else the one-draw log p(z) - log q(z|x). (A bottom-up guide of a stack
    draws z_1 before z_2, while p(z_1 | z_2) depends on z_2: there the closed form would be biased, and
    Pyro's estimator, which assumes the order, warns.) The
    observed sites contribute log p(x|z). Every guide site must be reparameterized. Where the KL is
    in closed form, log p(z) and log q(z|x) are not computed at all (the stock estimator scores them
    and leaves them unused).

    Both give the stock estimators' loss and gradients under the same noise, scoring the sites in
    the same order. The stock ones read values back to the host at every call: per-site sums and the
    surrogate loss as Python floats, and NaN checks on the loss and on its gradient.
    """

    def __init__(self, vae: nn.Module, kl: str = "mc", free_bits: float = 0.0):
        super().__init__()
        if kl not in ("analytic", "mc"):
            raise ValueError(f"kl must be 'analytic' or 'mc', got {kl!r}")
        if free_bits and kl != "analytic":
            raise ValueError("free bits floor each layer's KL term, which only kl='analytic' keeps apart")
        self.vae, self.kl, self.free_bits = vae, kl, float(free_bits)
        self._model, self._guide = vae.model, vae.guide  # bound once, as in PyroELBO

    def forward(self, x: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        guide_trace = poutine.trace(self._guide).get_trace(x, kl_weight=kl_weight)
        model_trace = poutine.trace(poutine.replay(self._model, trace=guide_trace)).get_trace(x, kl_weight=kl_weight)
        if is_validation_enabled():  # shapes and names only: no value is read
            check_model_guide_match(model_trace, guide_trace)
        model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
        if self.kl == "analytic":
            elbo = _mean_field_elbo(model_sites, guide_sites, self.free_bits)
        else:
            elbo = _trace_elbo(model_sites, guide_sites)
        return -elbo


def _sample_sites(trace) -> dict:
    """The sample sites of a trace by name, in the order they ran, without plates' subsample sites."""
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def _log_prob(site) -> torch.Tensor:
    """log density of the site's value, scaled and masked as the site says: the site's batch shape."""
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_p, site["scale"], site["mask"])


def _trace_elbo(model_sites: dict, guide_sites: dict) -> torch.Tensor:
    """Trace_ELBO's one-particle estimate, a scalar; its value is the ELBO, its gradient the estimator's."""
    # every model site first, then the guide: the order stock Pyro scores them in (flows cache values)
    log_p = {name: _log_prob(site) for name, site in model_sites.items()}  # each (batch,) in the data plate
    elbo = 0.0
    for term in log_p.values():
        elbo = elbo + term.sum()
    log_q = {}
    gradient_only = 0.0  # surrogate minus ELBO: no value, the score-function gradient
    score_functions = []
    for name, site in guide_sites.items():
        log_prob, score_function, entropy = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
        pathwise = is_identically_zero(score_function) and entropy is log_prob  # fully reparameterized
        log_q[name] = scale_and_mask(log_prob, site["scale"], site["mask"])
        elbo = elbo - log_q[name].sum()
        if not pathwise:
            # the surrogate keeps only the reparameterized part of log q, plus the score-function term
            gradient_only = gradient_only + log_q[name].sum()
            if not is_identically_zero(entropy):
                gradient_only = gradient_only - scale_and_mask(entropy, site["scale"], site["mask"]).sum()
            if not is_identically_zero(score_function):
                score_functions.append((site, score_function))
    if score_functions:
        log_r = _log_ratio(model_sites, log_p, log_q)
        for site, score_function in score_functions:
            gradient_only = gradient_only + (log_r.sum_to(site["cond_indep_stack"]) * score_function).sum()
    if torch.is_tensor(gradient_only):
        elbo = elbo + (gradient_only - gradient_only.detach())  # exactly zero in value
    return elbo


def _log_ratio(model_sites: dict, log_p: dict, log_q: dict) -> MultiFrameTensor:
    """log p - log q of every model site, detached and kept per plate: the score function's weight."""
    log_r = MultiFrameTensor()
    for name, site in model_sites.items():
        term = log_p[name] if site["is_observed"] else log_p[name] - log_q[name]
        log_r.add((site["cond_indep_stack"], term.detach()))  # keyed by the site's vectorized plates
    return log_r


def _mean_field_elbo(model_sites: dict, guide_sites: dict, free_bits: float = 0.0) -> torch.Tensor:
    """TraceMeanField_ELBO's one-particle estimate, a scalar: closed-form KL terms where torch has them.

    ``free_bits`` > 0 (Kingma et al. 2016, "free bits"): each latent site's KL term, summed over the
    batch, counts as at least ``free_bits`` nats per image, so a layer whose mean KL over the batch is
    below that floor is not pushed further towards its prior (its term has no gradient there)."""
    elbo = 0.0
    guide_order = {name: i for i, name in enumerate(guide_sites)}
    model_latents = []  # the latent sites met so far in the model: the ones a site may depend on
    for name, site in model_sites.items():
        if site["is_observed"]:
            elbo = elbo + _log_prob(site).sum()  # log p(x|z)
            continue
        if name not in guide_sites:
            raise ValueError(f"the mean-field ELBO needs the model's latent site {name!r} in the guide too")
        guide_site = guide_sites[name]
        # KL(q || p) integrates this site out with its parents held fixed: valid only if the guide drew
        # every latent the model drew before it (its possible parents) first, else its one-draw estimate
        closed_form = all(guide_order.get(parent, -1) < guide_order[name] for parent in model_latents)
        model_latents.append(name)
        kl = _closed_form_kl(guide_site, site) if closed_form else None
        if kl is None:  # no closed form: the one-draw estimate log q(z|x) - log p(z), scored p first
            log_p = _log_prob(site).sum()
            kl = _reparameterized_log_prob(guide_site).sum() - log_p
        if free_bits and torch.is_tensor(kl):  # (the term as weighted by kl_weight)
            kl = torch.clamp(kl, min=free_bits * guide_site["fn"].batch_shape.numel())
        elbo = elbo - kl
    for name, site in guide_sites.items():
        if name not in model_sites:  # an auxiliary guide site: its entropy term
            elbo = elbo - _reparameterized_log_prob(site).sum()
    return elbo


def _closed_form_kl(guide_site, model_site) -> torch.Tensor | None:
    """KL(q || p) summed over the guide site's batch, scaled and masked by it; None without a closed form."""
    q = guide_site["fn"]
    if not q.has_rsample:
        raise NotImplementedError(f"the mean-field ELBO needs a reparameterized guide; site {guide_site['name']!r} "
                                  f"is {type(q).__name__}")
    try:
        kl = kl_divergence(q, model_site["fn"])  # q's batch shape, e.g. (batch,)
    except NotImplementedError:
        return None
    kl = scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
    if not torch.is_tensor(kl):  # a constant: the same for every element of the batch
        return kl * q.batch_shape.numel()
    if kl.shape != q.batch_shape:
        raise ValueError(f"KL at site {guide_site['name']!r} has shape {tuple(kl.shape)}, expected the guide's "
                         f"batch shape {tuple(q.batch_shape)}")
    return kl.sum()


def _reparameterized_log_prob(site) -> torch.Tensor:
    """log q of a guide site that is fully reparameterized (its entropy term), scaled and masked; batch shape."""
    parts = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
    if not (site["fn"].has_rsample and is_identically_zero(parts.score_function)
            and not is_identically_zero(parts.entropy_term)):
        raise NotImplementedError(f"the mean-field ELBO needs a reparameterized guide; site {site['name']!r} "
                                  f"is {type(site['fn']).__name__}")
    return scale_and_mask(parts.entropy_term, site["scale"], site["mask"])


#: The estimators (``train.objective``) and their implementations (``train.implementation``): ``traced``,
#: ours, scored from Pyro's traces with no read back from the device; ``pyro``, Pyro's own estimator;
#: ``manual``, the hand-coded one in plain PyTorch (:mod:`pyrovae.elbo_manual`).
ESTIMATORS = ("meanfield", "elbo", "iwae", "iwae_dreg")
IMPLEMENTATIONS = ("traced", "pyro", "manual")

#: Objectives by (estimator, implementation): a factory taking the VAE and ``particles`` (K, for the IWAE bounds).
OBJECTIVES = {
    ("elbo", "traced"): lambda vae, particles=1: TracedELBO(vae, kl="mc"),
    ("elbo", "pyro"): lambda vae, particles=1: PyroELBO(vae, Trace_ELBO()),
    ("elbo", "manual"): lambda vae, particles=1: ManualELBO(vae, kl="mc"),
    ("meanfield", "traced"): lambda vae, particles=1: TracedELBO(vae, kl="analytic"),
    ("meanfield", "pyro"): lambda vae, particles=1: PyroELBO(vae, TraceMeanField_ELBO()),
    ("meanfield", "manual"): lambda vae, particles=1: ManualELBO(vae, kl="analytic"),
    ("iwae", "traced"): lambda vae, particles=1: PyroIWAE(vae, particles),
    ("iwae", "manual"): lambda vae, particles=1: ManualIWAE(vae, particles),
    ("iwae_dreg", "traced"): lambda vae, particles=1: PyroDReG(vae, particles),
}

#: The objectives that take ``free_bits`` (a floor under each latent layer's KL term).
FREE_BITS_OBJECTIVES = (("meanfield", "traced"),)


def resolve_objective(name: str, implementation: str = "traced") -> tuple[str, str]:
    """(estimator, implementation) for an objective name, old one-word names included; a ValueError
    that lists what there is for a name or a pair that does not exist."""
    if name in OLD_NAMES:
        if implementation not in ("traced", OLD_NAMES[name][1]):
            raise ValueError(f"the objective {name!r} is {OLD_NAMES[name][0]!r} implemented by "
                             f"{OLD_NAMES[name][1]!r}, which contradicts implementation {implementation!r}")
        return OLD_NAMES[name]
    if name not in ESTIMATORS:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(ESTIMATORS)} (the earlier names "
                         f"{', '.join(OLD_NAMES)} are still read)")
    if (name, implementation) not in OBJECTIVES:
        has = [i for e, i in OBJECTIVES if e == name]
        raise ValueError(f"the objective {name!r} has no {implementation!r} implementation; it has: {', '.join(has)}"
                         if implementation in IMPLEMENTATIONS else
                         f"unknown implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    return name, implementation


def check_objective(t) -> None:
    """A :class:`ConfigError` unless ``train.objective`` and ``train.implementation`` (of a
    :class:`pyrovae.config.TrainConfig`) name an objective here, and ``train.free_bits`` suits it."""
    try:
        key = resolve_objective(t.objective, t.implementation)
    except ValueError as e:
        raise ConfigError(f"train.objective {t.objective!r}, train.implementation {t.implementation!r}: {e}") from None
    if t.free_bits and key not in FREE_BITS_OBJECTIVES:
        raise ConfigError(f"train.free_bits floors each layer's closed-form KL term, which the objective "
                          f"{key[0]!r} ({key[1]}) does not keep apart; use train.objective = meanfield with "
                          f"train.implementation = traced")


def build_objective(name: str, vae: nn.Module, particles: int = 1, free_bits: float = 0.0,
                    implementation: str = "traced") -> nn.Module:
    """The loss module of estimator ``name`` (or an old one-word name) implemented by ``implementation``."""
    key = resolve_objective(name, implementation)
    if free_bits:
        if key not in FREE_BITS_OBJECTIVES:
            raise ValueError(f"free bits apply to the objective meanfield (traced), not {key[0]} ({key[1]})")
        return TracedELBO(vae, kl="analytic", free_bits=free_bits)
    return OBJECTIVES[key](vae, particles)
