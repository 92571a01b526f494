"""Evaluation: the -ELBO and the importance-sampled log-likelihood against oracles."""

import math

import pytest
import torch

from helpers import binary_images, extreme_bernoulli_case
from pyrovae import ModelConfig, build_vae
from pyrovae.evaluate import evaluate, importance_log_likelihood


def test_iwae_with_one_sample_is_the_elbo_and_grows_with_k():
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(z_dim=3, hidden=(32,)))
    x = binary_images(20)
    one = importance_log_likelihood(vae, x, k=1, seed=5)
    assert one["neg_log_likelihood"] == pytest.approx(one["neg_elbo"], abs=1e-4)
    bounds = [importance_log_likelihood(vae, x, k=k, seed=s)["neg_log_likelihood"]
              for k in (1, 10, 100) for s in range(3)]
    means = [sum(bounds[i:i + 3]) / 3 for i in (0, 3, 6)]
    assert means[0] > means[1] > means[2]  # -IWAE_K decreases (the bound tightens) as K grows


def _exact_case():
    """A VAE whose decoder ignores z and whose encoder returns the prior: every weight is p(x) exactly."""
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(z_dim=3, hidden=(16,)))
    with torch.no_grad():
        vae.decoder.net[-1].weight.zero_()  # p(x|z) = p(x)
        head = vae.posterior.encoder.head
        head.weight.zero_()
        head.bias[:3] = 0.0  # loc = 0
        head.bias[3:] = math.log(math.expm1(1.0 - vae.posterior.encoder.min_scale))  # scale = 1
    x = binary_images(8)
    exact = -vae.likelihood(vae.decoder(torch.zeros(8, 3))).log_prob(x).mean().item()
    return vae, x, exact


def test_iwae_equals_the_exact_marginal_when_every_weight_is_p_x():
    vae, x, exact = _exact_case()
    for k in (1, 7, 50):
        assert importance_log_likelihood(vae, x, k=k)["neg_log_likelihood"] == pytest.approx(exact, rel=1e-6)


def test_iwae_chunking_changes_nothing_but_memory():
    vae, x, exact = _exact_case()
    a = importance_log_likelihood(vae, x, k=64, max_rows=10_000)
    b = importance_log_likelihood(vae, x, k=64, max_rows=30)
    assert a["neg_log_likelihood"] == pytest.approx(b["neg_log_likelihood"], rel=1e-6)


def test_bad_k_is_refused():
    vae = build_vae(ModelConfig(z_dim=2, hidden=(8,)))
    with pytest.raises(ValueError, match="positive integer"):
        importance_log_likelihood(vae, binary_images(2), k=0)


def test_evaluate_is_seeded_and_leaves_the_callers_random_stream_alone():
    vae = build_vae(ModelConfig(z_dim=2, hidden=(8,)))
    x = binary_images(50)
    torch.manual_seed(123)
    a = evaluate(vae, x)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = evaluate(vae, x)
    assert a == b and torch.equal(torch.rand(1), after)
    assert a["neg_elbo"] == pytest.approx(a["kl"] - a["reconstruction"])
    assert not math.isnan(a["neg_elbo"])


def test_active_units_count_the_dimensions_the_encoder_uses():
    from pyrovae.evaluate import active_units

    torch.manual_seed(0)
    vae = build_vae(ModelConfig(z_dim=4, hidden=(16,)))
    with torch.no_grad():
        head = vae.posterior.encoder.head
        head.weight[1:4].zero_()  # only the mean of z_0 depends on x
        head.bias[1:4] = 0.0
        head.weight[0] *= 50
    result = active_units(vae, binary_images(200))
    assert result["active_units"] == 1 and result["z_dim"] == 4
    assert result["variances"][1:] == [0.0, 0.0, 0.0] and result["variances"][0] > 0.01


@pytest.mark.parametrize("network", ["mlp", "conv"])
def test_iwae_agrees_with_pyros_renyi_elbo_at_alpha_zero(network):
    """Pyro's RenyiELBO(alpha=0) with K vectorized particles is the IWAE bound: same expectation."""
    import pyro
    from pyro.infer import RenyiELBO

    torch.manual_seed(0)
    vae = build_vae(ModelConfig(z_dim=3, hidden=(16,), network=network, network_options={}
                                if network == "mlp" else {"channels": (4,)}))
    x = binary_images(6)
    k, repeats = 20, 40
    elbo = RenyiELBO(alpha=0.0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    pyro_values, ours = [], []
    for seed in range(repeats):
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            pyro_values.append(elbo.loss(vae.model, vae.guide, x) / x.shape[0])
        ours.append(importance_log_likelihood(vae, x, k=k, seed=1000 + seed)["neg_log_likelihood"])
    a, b = torch.tensor(pyro_values), torch.tensor(ours)
    se = (a.var() / repeats + b.var() / repeats).sqrt()
    assert (a.mean() - b.mean()).abs() < 4 * se + 1e-3


# --- the estimator against a closed form: a VAE that is probabilistic PCA --------------------------
def _linear_gaussian_vae(seed=0):
    """A VAE built from the registry whose log p(x) is known: no hidden layers, so the decoder is
    affine (z -> W z + b), with the normal likelihood at a fixed scale s and the N(0, I) prior:
    p(x) = N(b, W W^T + s^2 I). The encoder stays a generic (imperfect) amortized guide."""
    from pyrovae.lecture.ppca import LinearGaussian

    torch.manual_seed(seed)
    vae = build_vae(ModelConfig(z_dim=2, hidden=(), network="mlp", likelihood="normal",
                                likelihood_options={"scale": "fixed", "scale_value": 0.3}), image_shape=(1, 3, 3))
    vae.double()
    layer = vae.decoder.net[-1]
    assert isinstance(layer, torch.nn.Linear) and len(vae.decoder.net) == 1  # affine: nothing else in the way
    exact = LinearGaussian(layer.weight.detach(), layer.bias.detach(), torch.tensor(0.3, dtype=torch.float64))
    return vae, exact


def test_iwae_converges_to_the_closed_form_log_likelihood_of_a_linear_gaussian_vae():
    vae, exact = _linear_gaussian_vae()
    x = torch.rand(40, 1, 3, 3, dtype=torch.float64)
    truth = -exact.log_marginal(x.flatten(1)).mean().item()
    errors = {}
    for k in (1, 10, 100, 1000, 10_000):
        runs = torch.tensor([importance_log_likelihood(vae, x, k=k, seed=s, batch_size=40)["neg_log_likelihood"]
                             for s in range(4)])
        errors[k] = runs.mean().item() - truth
        if k == 10_000:  # within Monte Carlo error of the exact answer
            assert abs(errors[k]) < 4 * runs.std().item() / 2 + 2e-3, errors
    assert all(e > -1e-3 for e in errors.values()), errors  # a bound: never below -log p(x) beyond noise
    assert errors[1] > errors[10] > errors[100] > errors[1000], errors  # and it closes as K grows
    assert errors[1] > 0.1  # the guide is imperfect, so there was a gap to close


def test_elbo_below_iwae_k_below_iwae_k_prime_on_average():
    """E[log p_hat_K] is non-decreasing in K (Burda et al. 2015, Theorem 1): ELBO <= IWAE_5 <= IWAE_50."""
    vae, _ = _linear_gaussian_vae(seed=1)
    x = torch.rand(200, 1, 3, 3, dtype=torch.float64)
    draws = {k: torch.tensor([importance_log_likelihood(vae, x, k=k, seed=s, batch_size=200)["neg_log_likelihood"]
                              for s in range(10)]) for k in (1, 5, 50)}
    elbo = torch.tensor([evaluate(vae, x, seed=s)["neg_elbo"] for s in range(10)])
    def gap(a, b):  # mean difference and its standard error, from independent repeats
        return (a.mean() - b.mean()).item(), (a.var() / len(a) + b.var() / len(b)).sqrt().item()

    difference, se = gap(elbo, draws[1])
    assert abs(difference) < 4 * se  # IWAE_1 is the ELBO
    for small, large in ((1, 5), (5, 50)):
        difference, se = gap(draws[small], draws[large])
        assert difference > 4 * se, (small, large, difference, se)  # -IWAE_K falls as K grows


# --- the estimator's CPU fast paths against float64 and against the stock ops ---------------------
def _stock_paths_only(monkeypatch):
    """Run the estimator as if it had no fast paths: stock modules, the likelihood's own log_prob."""
    import contextlib

    from pyrovae import evaluate as ev

    monkeypatch.setattr(ev, "_fast_paths_for", lambda images: contextlib.nullcontext())
    monkeypatch.setattr(ev, "_log_px_z", lambda likelihood, outputs, x: likelihood.log_prob(outputs, x))


def _counting_routes(monkeypatch):
    """Count, by function name, the calls the fast-path mode reroutes (not those it declines)."""
    from collections import Counter

    from pyrovae.evaluate import _CPUFastPaths

    taken = Counter()
    for func, route in list(_CPUFastPaths._ROUTES.items()):
        def counted(*args, _route=route, _name=func.__name__, **kwargs):
            out = _route(*args, **kwargs)
            taken[_name] += out is not None
            return out
        monkeypatch.setitem(_CPUFastPaths._ROUTES, func, counted)
    return taken


def test_linear_route_is_the_same_product():
    """``nn.Linear`` under the estimator's mode (oneDNN without gradients) against float64, for 2-D,
    3-D and non-contiguous inputs; with gradients the mode leaves it to the stock op."""
    from torch import nn
    from torch.nn import functional as F

    from pyrovae.evaluate import _CPUFastPaths

    torch.manual_seed(0)
    layer = nn.Linear(400, 784)
    for x in (torch.randn(300, 400), torch.randn(7, 11, 400), torch.randn(9, 400).t().contiguous().t()):
        reference = F.linear(x.double(), layer.weight.double(), layer.bias.double())
        with torch.no_grad(), _CPUFastPaths():
            fast = layer(x)
        assert fast.shape == reference.shape and fast.dtype == torch.float32
        torch.testing.assert_close(fast.double(), reference, rtol=1e-5, atol=1e-5)
        with _CPUFastPaths():
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # with gradients: the stock op


def test_softplus_route_is_softplus():
    from torch import nn
    from torch.nn import functional as F

    from pyrovae.evaluate import _CPUFastPaths

    x = torch.cat([torch.linspace(-120, 120, 100_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, 20.001])])
    with torch.no_grad(), _CPUFastPaths():
        fast = nn.Softplus()(x)
        other_beta = F.softplus(x, beta=2.0)
    torch.testing.assert_close(fast.double(), F.softplus(x.double()), rtol=2e-7, atol=6e-8)
    assert (fast >= 0).all()
    assert torch.equal(other_beta, F.softplus(x, beta=2.0))  # a softplus the route does not cover: the stock op
    with _CPUFastPaths():
        assert torch.equal(nn.Softplus()(x), F.softplus(x))  # with gradients: the stock op


def test_linear_route_falls_back_to_the_stock_op_where_onednn_fails(monkeypatch):
    from torch import nn
    from torch.nn import functional as F

    from pyrovae import evaluate as ev

    def broken(*args):
        raise RuntimeError("no oneDNN kernel for this CPU")

    monkeypatch.setattr(ev, "_ONEDNN", True)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken, raising=False)
    layer = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    with torch.no_grad(), ev._CPUFastPaths():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert ev._ONEDNN is False  # asked once, then the stock op


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 1, 127)], ids=["784", "3072", "prime-127"])
def test_fast_bernoulli_log_prob_against_float64_at_extreme_logits(shape):
    """The estimator's Bernoulli log-density sums softplus through products of 1 + exp(-|l|) in
    blocks; it stays within float32 rounding of the float64 value, saturated logits included."""
    from pyrovae.evaluate import _log_px_z

    logits, x, lik, reference = extreme_bernoulli_case(shape)
    with torch.no_grad():
        fast = _log_px_z(lik, logits, x)
    assert fast.shape == (40, 5) and fast.dtype == torch.float32
    scale = logits.abs().flatten(-3).sum(-1).double()  # float32 rounding grows with the size of the terms
    assert ((fast.double() - reference).abs() <= 1e-6 * scale + 1e-4).all()


def _float64_reference(vae, x, k, seed):
    """-log p(x) per image by IWAE-k on the estimator's own draws (all k in one chunk), with the
    networks, likelihood and densities run by the stock ops in float64."""
    import copy

    from pyrovae.evaluate import batch_noise

    vae64 = copy.deepcopy(vae).double()
    with torch.no_grad():
        with batch_noise(seed, 0, x.device):  # the stream of the batch that starts at image 0
            z = vae.posterior(x).sample((k,)).double()  # (k, B, z_dim): the draws the estimator makes
        x64 = x.double()
        log_w = (vae64.likelihood(vae64.decoder(z)).log_prob(x64) + vae64.prior().log_prob(z)
                 - vae64.posterior(x64).log_prob(z))  # (k, B)
        return -(torch.logsumexp(log_w, 0) - math.log(k)).mean().item()


def _images_for(likelihood: str, n: int = 6):
    g = torch.Generator().manual_seed(3)
    if likelihood == "bernoulli":
        return binary_images(n)
    if likelihood == "discretized_logistic":
        return torch.randint(0, 256, (n, 1, 28, 28), generator=g).float() / 255
    return torch.rand((n, 1, 28, 28), generator=g)


def _vae_for(network: str, likelihood: str):
    torch.manual_seed(0)
    options = {"scale": "learned", "scale_value": 1.0} if likelihood == "normal" else {}
    return build_vae(ModelConfig(z_dim=5, hidden=(64,), network=network,
                                 network_options={} if network == "mlp" else {"channels": (4,)},
                                 likelihood=likelihood, likelihood_options=options))


@pytest.mark.parametrize("likelihood", ["bernoulli", "normal", "discretized_logistic"])
@pytest.mark.parametrize("network", ["mlp", "conv"])
def test_fast_estimator_agrees_with_float64_and_with_the_stock_ops(network, likelihood, monkeypatch):
    """On the CPU in float32 the estimator takes the fast routes (checked: they are taken); its figure
    equals a float64 computation on the same draws and the estimator's own without the fast paths."""
    vae, x, k = _vae_for(network, likelihood), _images_for(likelihood), 40
    reference = _float64_reference(vae, x, k, seed=7)
    taken = _counting_routes(monkeypatch)
    fast = importance_log_likelihood(vae, x, k=k, seed=7, batch_size=len(x), max_rows=len(x) * k)
    assert taken["linear"] > 0 and taken["softplus"] > 0
    assert fast["neg_log_likelihood"] == pytest.approx(reference, rel=2e-6, abs=2e-4)
    _stock_paths_only(monkeypatch)
    stock = importance_log_likelihood(vae, x, k=k, seed=7, batch_size=len(x), max_rows=len(x) * k)
    assert fast["neg_log_likelihood"] == pytest.approx(stock["neg_log_likelihood"], rel=2e-6, abs=2e-4)
    assert fast["neg_elbo"] == pytest.approx(stock["neg_elbo"], rel=2e-6, abs=2e-4)


@pytest.mark.parametrize("likelihood", ["bernoulli", "normal"])
@pytest.mark.parametrize("stack", [False, True])
def test_evaluate_takes_the_fast_routes_and_agrees_with_the_stock_ops(likelihood, stack, monkeypatch):
    """The -ELBO of ``evaluate`` (the figure every epoch prints) through the fast routes (checked:
    they are taken) against the same draws through the stock modules and the likelihood's own
    log_prob: equal to float32 rounding, term by term, for one layer and for a stack."""
    vae = _vae_for("mlp", likelihood)
    if stack:
        torch.manual_seed(0)
        options = {"scale": "learned", "scale_value": 1.0} if likelihood == "normal" else {}
        vae = build_vae(ModelConfig(hidden=(64,), latents=(5, 3), inference="bottom_up", prior="vamp",
                                    prior_options={"components": 4}, likelihood=likelihood,
                                    likelihood_options=options))
    from pyrovae import evaluate as ev

    x = _images_for(likelihood, 12)
    taken = _counting_routes(monkeypatch)
    bernoulli = ev._bernoulli_log_prob
    monkeypatch.setattr(ev, "_bernoulli_log_prob", lambda *a: taken.update(["bernoulli"]) or bernoulli(*a))
    fast = evaluate(vae, x, batch_size=5, seed=3)
    assert taken["linear"] > 0 and taken["softplus"] > 0
    assert taken["bernoulli"] == (3 if likelihood == "bernoulli" and not stack else 0)  # one layer: 3 batches
    _stock_paths_only(monkeypatch)
    stock = evaluate(vae, x, batch_size=5, seed=3)
    for key in ("neg_elbo", "reconstruction", "kl"):
        assert fast[key] == pytest.approx(stock[key], rel=2e-6, abs=2e-5), key


def test_the_fast_bernoulli_form_is_kept_for_binary_images():
    """The fast form assumes x in {0, 1}; grey pixels (past a first batch that ``check_data`` saw)
    are scored by the likelihood's own log_prob, x l - softplus(l)."""
    from pyrovae.evaluate import _log_px_z

    vae = _vae_for("mlp", "bernoulli")
    logits = torch.randn(3, 1, 28, 28)
    grey = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(_log_px_z(vae.likelihood, logits, grey), vae.likelihood.log_prob(logits, grey),
                                   rtol=0, atol=0)


def test_fast_paths_only_for_float32_on_the_cpu_without_gradients(monkeypatch):
    """A float64 estimate takes no fast route, and the mode is gone once the estimator returns."""
    from torch import nn

    vae, x = _vae_for("mlp", "bernoulli"), binary_images(4)
    taken = _counting_routes(monkeypatch)
    importance_log_likelihood(vae.double(), x.double(), k=5)
    assert sum(taken.values()) == 0
    vae.float()
    importance_log_likelihood(vae, x, k=5)
    assert taken["linear"] > 0
    before = dict(taken)
    with torch.no_grad():
        nn.Linear(3, 2)(torch.randn(4, 3))  # outside the estimator: no route
    assert dict(taken) == before
