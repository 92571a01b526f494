"""A stack of stochastic layers (pyrovae.hierarchy) against its oracles: stock Pyro's estimators under
the same noise, the exact log-likelihood of a linear-Gaussian two-layer model, and the eager step."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import MultivariateNormal, kl_divergence

from helpers import assert_traced_equals_eager, small_options
from pyrovae import Config, ModelConfig, build_vae
from pyrovae.compiled import TracedLoss
from pyrovae.config import ConfigError
from pyrovae.objectives import check_objective
from pyrovae.parts import resolve_parts
from pyrovae.evaluate import active_units, elbo_terms, evaluate, importance_log_likelihood, seeded_noise
from pyrovae.hierarchy import HierarchicalVAE, precision_weighted, residual
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.objectives import PyroELBO, TracedELBO, build_objective
from pyrovae.priors import PRIORS

SHAPE = (1, 4, 4)
INFERENCES = ("top_down", "top_down_residual", "bottom_up")
EXACT = ("top_down", "bottom_up")  # the guides whose family holds the linear-Gaussian model's posterior


def _stack(inference="top_down", prior="normal", likelihood="bernoulli", latents=(3, 2), seed=0, skip=False):
    torch.manual_seed(seed)
    config = ModelConfig(latents=latents, hidden=(8,), latent_hidden=(6,), inference=inference, prior=prior,
                         likelihood=likelihood, prior_options=small_options(PRIORS[prior]), decoder_skip=skip)
    return build_vae(config, SHAPE)


def _images(n=5, seed=1):
    return torch.bernoulli(torch.full((n, *SHAPE), 0.4), generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(loss_fn, vae, x, kl_weight=0.7, seed=3):
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    loss = loss_fn(x, kl_weight=kl_weight)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in vae.named_parameters() if p.grad is not None}


def _assert_same(a, b, rtol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=1e-4)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=1e-4, msg=name)


# --- the programs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("inference", INFERENCES)
def test_each_layer_is_one_named_site_and_the_model_runs_top_down(inference):
    vae = _stack(inference, latents=(3, 2, 2))
    x = _images()
    guide = poutine.trace(vae.guide).get_trace(x)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    latent = [n for n, s in model.nodes.items() if s["type"] == "sample" and not s["is_observed"] and n != "data"]
    assert latent == ["z3", "z2", "z1"]  # generative order
    drawn = [n for n, s in guide.nodes.items() if s["type"] == "sample" and n != "data"]
    assert drawn == (["z3", "z2", "z1"] if inference != "bottom_up" else ["z1", "z2", "z3"])
    assert [guide.nodes[f"z{i}"]["value"].shape[-1] for i in (1, 2, 3)] == [3, 2, 2]
    # the guide's draws reach the model: p(z1 | z2) is evaluated at the guide's z2
    expected = vae.conditional(1, guide.nodes["z2"]["value"]).log_prob(guide.nodes["z1"]["value"])
    torch.testing.assert_close(model.nodes["z1"]["fn"].log_prob(model.nodes["z1"]["value"]), expected)


def test_predictive_and_the_generative_model_work_unchanged():
    vae = _stack()
    draws = Predictive(vae.model, num_samples=4)(batch_size=3)
    assert draws["x"].shape == (4, 3, *SHAPE) and draws["z2"].shape == (4, 3, 2) and draws["z1"].shape == (4, 3, 3)
    assert vae.sample(5).shape == (5, *SHAPE)
    top = torch.zeros(5, 2)
    torch.manual_seed(0)
    a = vae.sample_layers(5, top)
    torch.manual_seed(0)
    b = vae.sample_layers(5, top)
    assert torch.equal(a, b) and a.shape == (5, 3)


def test_the_top_down_guide_is_the_precision_weighted_product():
    loc, scale = precision_weighted(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([1.0]))
    # N(1, 4) N(-1, 1): precision 1/4 + 1 = 5/4, mean (1/4 - 1) / (5/4) = -0.6
    torch.testing.assert_close(loc, torch.tensor([-0.6]))
    torch.testing.assert_close(scale, torch.tensor([(4 / 5) ** 0.5]))


def test_the_residual_top_down_guide_shifts_and_scales_the_model_conditional():
    loc, scale = residual(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([-1.0]), torch.tensor([3.0]))
    torch.testing.assert_close(loc, torch.tensor([0.0]))
    torch.testing.assert_close(scale, torch.tensor([1.5]))
    vae, x = _stack("top_down_residual"), _images()
    (m1, s1), _ = vae.posterior.estimates(x)
    layers = vae.walk_guide(x, lambda _, q: q.mean)
    p = vae.conditional(1, layers["z2"][0])
    torch.testing.assert_close(layers["z1"][1].mean, p.mean + m1)
    torch.testing.assert_close(layers["z1"][1].stddev, p.stddev * s1)
    # its KL depends on the estimates only: 0.5 * sum(s^2 + m^2 / sigma_p^2 - 1 - log s^2)
    closed = 0.5 * (s1 ** 2 + (m1 / p.stddev) ** 2 - 1 - torch.log(s1 ** 2)).sum(-1)
    torch.testing.assert_close(kl_divergence(layers["z1"][1], p), closed)


# --- the objectives against stock Pyro ---------------------------------------------------------------
@pytest.mark.parametrize("inference, prior, skip", [
    ("top_down", "normal", False), ("top_down", "vamp", False), ("top_down_residual", "normal", False),
    ("top_down_residual", "vamp", False), ("bottom_up", "normal", False), ("bottom_up", "mog", False),
    ("bottom_up", "vamp", False), ("top_down_residual", "vamp", True), ("bottom_up", "vamp", True),
    ("top_down", "normal", True)])
def test_traced_and_hand_coded_objectives_equal_trace_elbo_under_the_same_noise(inference, prior, skip):
    vae, x = _stack(inference, prior, skip=skip), _images()
    stock = _loss_and_grads(lambda x, kl_weight: Trace_ELBO().differentiable_loss(vae.model, vae.guide, x,
                                                                                  kl_weight=kl_weight), vae, x)
    _assert_same(_loss_and_grads(TracedELBO(vae, "mc"), vae, x), stock)
    _assert_same(_loss_and_grads(build_objective("manual_mc", vae), vae, x), stock)


@pytest.mark.parametrize("inference, skip", [("top_down", False), ("top_down_residual", False),
                                             ("top_down_residual", True)])
def test_top_down_closed_form_kl_equals_trace_mean_field_elbo_and_the_hand_coded_one(inference, skip):
    vae, x = _stack(inference, skip=skip, latents=(3, 2, 2)), _images()
    stock = _loss_and_grads(lambda x, kl_weight: TraceMeanField_ELBO().differentiable_loss(
        vae.model, vae.guide, x, kl_weight=kl_weight), vae, x)
    _assert_same(_loss_and_grads(TracedELBO(vae, "analytic"), vae, x), stock)
    _assert_same(_loss_and_grads(build_objective("manual_analytic", vae), vae, x), stock)


def test_bottom_up_takes_the_kl_in_closed_form_only_for_the_top_layer():
    """Under q(z1|x) q(z2|z1), p(z1|z2) depends on z2, drawn after z1: the closed form for z1 would
    be biased. Ours scores z1 by its one-draw estimate and z2 in closed form; the hand-coded one
    agrees; stock TraceMeanField_ELBO, which assumes the order, is refused with the reason."""
    vae, x = _stack("bottom_up"), _images()
    ours = _loss_and_grads(TracedELBO(vae, "analytic"), vae, x)
    _assert_same(_loss_and_grads(build_objective("manual_analytic", vae), vae, x), ours)
    pyro.set_rng_seed(3)
    guide = poutine.trace(vae.guide).get_trace(x, kl_weight=0.7)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x, kl_weight=0.7)
    z1, z2 = guide.nodes["z1"], guide.nodes["z2"]
    expected = (model.nodes["x"]["fn"].log_prob(x).sum()
                + 0.7 * (model.nodes["z1"]["fn"].log_prob(z1["value"]) - z1["fn"].log_prob(z1["value"])).sum()
                - 0.7 * torch.distributions.kl_divergence(z2["fn"], model.nodes["z2"]["fn"]).sum())
    torch.testing.assert_close(ours[0], -expected.detach(), rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match="biased under a bottom-up guide"):
        PyroELBO(vae, TraceMeanField_ELBO())


@pytest.mark.parametrize("inference, skip", [(i, False) for i in INFERENCES] + [("bottom_up", True),
                                                                                ("top_down_residual", True)])
def test_iwae_on_the_stack_equals_the_hand_coded_iwae(inference, skip):
    vae, x = _stack(inference, skip=skip), _images()
    _assert_same(_loss_and_grads(build_objective("iwae", vae, 4), vae, x),
                 _loss_and_grads(build_objective("manual_iwae", vae, 4), vae, x))


@pytest.mark.parametrize("prior, likelihood", [(p, "bernoulli") for p in PRIORS] + [("normal", l) for l in LIKELIHOODS])
def test_every_prior_sits_on_top_and_every_likelihood_on_the_data(prior, likelihood):
    vae, x = _stack("top_down", prior, likelihood), _images()
    stock = _loss_and_grads(lambda x, kl_weight: Trace_ELBO().differentiable_loss(vae.model, vae.guide, x,
                                                                                  kl_weight=kl_weight), vae, x)
    _assert_same(_loss_and_grads(TracedELBO(vae, "mc"), vae, x), stock)
    assert torch.isfinite(stock[0]) and vae.sample(2).shape == (2, *SHAPE)


@pytest.mark.parametrize("inference, skip", [(i, False) for i in INFERENCES] + [("top_down_residual", True)])
def test_the_traced_graph_gives_the_eager_loss_bit_for_bit(inference, skip):
    vae, x = _stack(inference, skip=skip), _images(8)
    loss_fn = build_objective("meanfield", vae)
    assert_traced_equals_eager(loss_fn, TracedLoss(loss_fn, compiler=lambda graph: graph), vae, x)


# --- the exact oracle: a linear-Gaussian two-layer model ---------------------------------------------
def _set_head(net, weight, bias, scale):
    """A linear GaussianNet with loc = weight @ h + bias and a constant scale."""
    out = weight.shape[0]
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.weight[:out] = weight
        net.head.bias[:out] = bias
        y = torch.as_tensor(scale, dtype=torch.float64) - net.min_scale  # softplus^-1(scale - min_scale)
        net.head.bias[out:] = y + torch.log(-torch.expm1(-y))


def _linear_gaussian(inference):
    """z2 ~ N(0, I_2), z1 | z2 ~ N(A z2 + a, s^2 I), x | z1 ~ N(B z1 + b, sigma^2 I_4), with A = a rotation
    times alpha and B's columns orthogonal: then the exact posterior p(z1, z2 | x) lies in both guide
    families, and the networks are set to it."""
    torch.manual_seed(0)
    config = ModelConfig(latents=(2, 2), hidden=(), latent_hidden=(), network="mlp", inference=inference,
                         likelihood="normal", likelihood_options={"scale": "fixed", "scale_value": 0.5})
    vae = build_vae(config, (1, 2, 2)).double()
    t = torch.tensor(0.7, dtype=torch.float64)
    A = 1.3 * torch.stack([torch.stack([t.cos(), -t.sin()]), torch.stack([t.sin(), t.cos()])])
    a0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    B = torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, 0.5], [1.0, -0.5]], dtype=torch.float64)
    B[:, 1] -= B[:, 0] * (B[:, 0] @ B[:, 1]) / (B[:, 0] @ B[:, 0])  # orthogonal columns
    B = B / B.norm(dim=0) * 1.5  # each column of squared norm beta = 2.25
    b, s, sigma, beta = torch.tensor([0.1, 0.0, -0.1, 0.2], dtype=torch.float64), 0.8, 0.5, 2.25
    eye = torch.eye(2, dtype=torch.float64)
    _set_head(vae.conditionals[0], A, a0, s)
    with torch.no_grad():
        vae.decoder.net[0].weight.copy_(B)
        vae.decoder.net[0].bias.copy_(b)
    cov_x = B @ (A @ A.T + s ** 2 * eye) @ B.T + sigma ** 2 * torch.eye(4, dtype=torch.float64)
    exact = MultivariateNormal(B @ a0 + b, covariance_matrix=cov_x)
    nets = vae.posterior.nets
    if inference == "top_down":
        _set_head(nets[0], B.T / beta, -B.T @ b / beta, sigma / beta ** 0.5)  # the data's estimate of z1
        c_inv = torch.linalg.inv(s ** 2 * B @ B.T + sigma ** 2 * torch.eye(4, dtype=torch.float64))
        cov2 = torch.linalg.inv(eye + A.T @ B.T @ c_inv @ B @ A)  # p(z2 | x): diagonal here
        M = cov2 @ A.T @ B.T @ c_inv
        _set_head(nets[1], M, -M @ (b + B @ a0), cov2[0, 0].sqrt())
    else:
        c1 = (1.3 ** 2 + s ** 2)  # Cov z1 = A A^T + s^2 I = c1 I
        var1 = 1 / (1 / c1 + beta / sigma ** 2)  # p(z1 | x)
        _set_head(nets[0], var1 * B.T / sigma ** 2, var1 * (a0 / c1 - B.T @ b / sigma ** 2), var1 ** 0.5)
        var2 = 1 / (1 + 1.3 ** 2 / s ** 2)  # p(z2 | z1)
        _set_head(nets[1], var2 * A.T / s ** 2, -var2 * A.T @ a0 / s ** 2, var2 ** 0.5)
    return vae, exact


@pytest.mark.parametrize("inference", EXACT)
def test_at_the_exact_posterior_every_estimator_is_the_exact_log_likelihood(inference):
    """log p(x, z) - log q(z|x) = log p(x) for every z when q is the posterior: the one-draw ELBO of
    every objective, IWAE-K and the evaluation's figures equal the closed form, draw by draw."""
    vae, exact = _linear_gaussian(inference)
    x = torch.randn(6, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    log_px = exact.log_prob(x.flatten(1))  # (6,)
    for name in ("trace_elbo", "elbo", "manual_mc", "iwae", "manual_iwae"):
        for seed in (0, 1):
            pyro.set_rng_seed(seed)
            loss = build_objective(name, vae, 3)(x)
            torch.testing.assert_close(-loss, log_px.sum(), rtol=1e-10, atol=1e-10, msg=name)
    torch.testing.assert_close(vae.log_weights(x, 4), log_px.expand(4, 6), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(elbo_terms(vae, x)["elbo"], log_px, rtol=1e-10, atol=1e-10)
    figures = importance_log_likelihood(vae, x, k=7)
    assert figures["neg_log_likelihood"] == pytest.approx(-log_px.mean().item(), rel=1e-10)


@pytest.mark.parametrize("inference", EXACT)
def test_closed_form_kl_objectives_are_unbiased_at_the_exact_posterior(inference):
    """The mean-field estimators are not zero-variance (log p(x|z1) varies with the draw), but their
    mean is log p(x): 4,000 draws, within 5 standard errors."""
    vae, exact = _linear_gaussian(inference)
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    many = x.expand(4000, 1, 2, 2)
    log_px = exact.log_prob(x.flatten(1)).item()
    for name in ("meanfield", "manual_analytic"):
        pyro.set_rng_seed(2)
        loss_fn = build_objective(name, vae)
        per_image = torch.stack([-loss_fn(many[i:i + 1]) for i in range(0, 400)])  # a spread from single images
        spread = per_image.std().item()
        pyro.set_rng_seed(3)
        mean = -loss_fn(many).item() / 4000
        assert abs(mean - log_px) < 5 * spread / math.sqrt(4000) + 1e-9, (name, mean, log_px, spread)


@pytest.mark.parametrize("inference", EXACT)
def test_away_from_the_posterior_the_bounds_sit_below_and_tighten_with_k(inference):
    vae, exact = _linear_gaussian(inference)
    with torch.no_grad():
        vae.posterior.nets[0].head.bias[:2] += 0.7  # a guide off the posterior
    x = torch.randn(50, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    log_px = exact.log_prob(x.flatten(1)).mean().item()
    bounds = [-importance_log_likelihood(vae, x, k=k, seed=1)["neg_log_likelihood"] for k in (1, 10, 1000)]
    assert bounds[0] < bounds[1] < bounds[2] < log_px
    assert log_px - bounds[2] < 0.1 * (log_px - bounds[0])


# --- config, evaluation, runs ------------------------------------------------------------------------
def test_one_layer_stays_the_default_and_a_stack_replaces_z_dim():
    assert ModelConfig().latents == () and not isinstance(build_vae(ModelConfig()), HierarchicalVAE)
    c = ModelConfig(latents=(100, 50), z_dim=7)
    assert c.z_dim == 100 and Config.from_dict({"model": {"latents": [100, 50]}}).model.latents == (100, 50)


@pytest.mark.parametrize("fields, message", [
    ({"latents": (5,)}, "two or more positive layer sizes"),
    ({"latents": (5, 0)}, "two or more positive layer sizes"),
    ({"latents": (5, 3), "inference": "sideways"}, "unknown model.inference 'sideways'; valid: top_down, top_down_residual, bottom_up"),
    ({"latents": (5, 3), "posterior": "iaf"}, "cannot take model.posterior = 'iaf'"),
    ({"latents": (5, 3), "network": "conv"}, "cannot take model.network = 'conv'"),
    ({"latent_hidden": (4, -1)}, "model.latent_hidden must be hidden widths"),
    ({"decoder_skip": True}, "true only for a stack of layers"),
    ({"latents": (5, 3), "decoder_skip": "yes"}, "model.decoder_skip must be true or false"),
])
def test_a_stack_it_cannot_build_is_refused_with_the_reason(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_parts(ModelConfig(**fields))


def test_active_units_are_counted_per_layer():
    vae = _stack(latents=(3, 2))
    units = active_units(vae, _images(40), threshold=0.0)
    assert set(units["layers"]) == {"z1", "z2"} and units["z_dim"] == 5
    assert units["active_units"] == sum(layer["active_units"] for layer in units["layers"].values())


def test_evaluate_gives_each_layers_kl_and_they_add_up_to_the_kl():
    """Per-layer KL estimates, from the same draws as the total: their sum is the total, per image
    and as evaluate's means."""
    vae, x = _stack(latents=(3, 2, 2)), _images(30)
    result = evaluate(vae, x, batch_size=7, seed=3)
    assert list(result["kl_layers"]) == ["z1", "z2", "z3"]
    assert math.isclose(sum(result["kl_layers"].values()), result["kl"], rel_tol=1e-6, abs_tol=1e-5)  # float32 per image
    with torch.no_grad(), seeded_noise(5, torch.device("cpu")):
        terms = elbo_terms(vae, x)
    assert set(terms) >= {"kl_z1", "kl_z2", "kl_z3"}
    torch.testing.assert_close(terms["kl_z1"] + terms["kl_z2"] + terms["kl_z3"], terms["kl"])


def test_a_stack_trains_resumes_and_evaluates_from_the_command_line(tmp_path, mnist_root):
    from pyrovae.cli import main

    run = tmp_path / "run"
    common = ["--latents", "6,3", "--hidden", "16", "--train-subset", "64", "--test-subset", "32", "--batch-size",
              "32", "--quiet", "--data-dir", str(mnist_root)]
    assert main(["train", "--epochs", "1", "--out", str(run), *common]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert main(["evaluate", str(run), "--particles", "5"]) == 0
    import json
    figures = json.loads((run / "evaluation.json").read_text())["test"]
    assert figures["z_dim"] == 9 and set(figures["active_units_per_layer"]) == {"z1", "z2"}
    assert json.loads((run / "config.json").read_text())["model"]["latents"] == [6, 3]
    assert (run / "layers.png").is_file()  # the top layer fixed in each row


def test_free_bits_floor_each_layer_kl_and_leave_layers_above_it_alone():
    """With a floor above every layer's KL the KL terms are constant (no gradient reaches the guide
    through them); with a floor of 0 the loss is the mean-field loss."""
    vae, x = _stack(), _images()
    plain = _loss_and_grads(build_objective("meanfield", vae), vae, x, kl_weight=1.0)
    _assert_same(_loss_and_grads(build_objective("meanfield", vae, free_bits=0.0), vae, x, kl_weight=1.0), plain)
    floored = _loss_and_grads(build_objective("meanfield", vae, free_bits=1e4), vae, x, kl_weight=1.0)

    def reconstruction_only(x, kl_weight):  # two layers at the floor: constants
        guide = poutine.trace(vae.guide).get_trace(x)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
        return -model.nodes["x"]["fn"].log_prob(x).sum() + 2 * 1e4 * x.shape[0]
    _assert_same(floored, _loss_and_grads(reconstruction_only, vae, x, kl_weight=1.0))
    with pytest.raises(ConfigError, match="train.free_bits floors each layer"):
        check_objective(Config.from_dict({"train": {"free_bits": 0.5, "objective": "iwae"}}).train)


# --- the residual stack ------------------------------------------------------------------------------
COLOUR = (3, 8, 8)


def _resnet_stack(latents=(32, 8, 4), seed=0, skip=False):
    """z1: 2 channels at 4x4, z2: 2 at 2x2, z3: 4 at 1x1, with an 8-bit likelihood."""
    torch.manual_seed(seed)
    config = ModelConfig(latents=latents, network="resnet", activation="elu", likelihood="discretized_logistic",
                         network_options={"width": 4, "blocks": 1, "stages": 1, "latent_channels": 2},
                         decoder_skip=skip)
    return build_vae(config, COLOUR)


def _colour_images(n=4):
    return torch.randint(0, 256, (n, *COLOUR), generator=torch.Generator().manual_seed(1)).float() / 255


@pytest.mark.parametrize("skip", [False, True])
def test_the_residual_stack_is_the_same_pyro_program_at_several_resolutions(skip):
    vae, x = _resnet_stack(skip=skip), _colour_images()
    guide = poutine.trace(vae.guide).get_trace(x)
    assert [guide.nodes[f"z{i}"]["value"].shape[-1] for i in (1, 2, 3)] == [32, 8, 4]
    stock = _loss_and_grads(lambda x, kl_weight: Trace_ELBO().differentiable_loss(vae.model, vae.guide, x,
                                                                                  kl_weight=kl_weight), vae, x)
    _assert_same(_loss_and_grads(TracedELBO(vae, "mc"), vae, x), stock)
    _assert_same(_loss_and_grads(build_objective("manual_mc", vae), vae, x), stock)
    mean_field = _loss_and_grads(lambda x, kl_weight: TraceMeanField_ELBO().differentiable_loss(
        vae.model, vae.guide, x, kl_weight=kl_weight), vae, x)
    _assert_same(_loss_and_grads(TracedELBO(vae, "analytic"), vae, x), mean_field)
    assert vae.sample(3).shape == (3, *COLOUR) and vae.log_weights(x, 2).shape == (2, 4)


def test_a_coarse_layer_conditions_the_finer_one_locally():
    """p(z1 | z2): changing one position of z2 (8 x 8 grid, upsampled to z1's 16 x 16) moves the z1
    positions near it, and none far away (the convolutions reach 4 positions)."""
    torch.manual_seed(0)
    config = ModelConfig(latents=(512, 128), network="resnet", activation="elu", likelihood="discretized_logistic",
                         network_options={"width": 4, "blocks": 1, "stages": 1, "latent_channels": 2})
    vae = build_vae(config, (3, 32, 32))
    z2 = torch.randn(1, 128)
    moved = z2.clone()
    moved[0, 0] += 5.0  # channel 0 at the top-left position of z2's grid
    before, after = vae.conditional(1, z2).mean, vae.conditional(1, moved).mean
    changed = (before - after).abs().view(2, 16, 16).sum(0) > 1e-6  # z1's grid
    assert changed[:2, :2].all() and not changed[6:].any() and not changed[:, 6:].any()


@pytest.mark.parametrize("fields, message", [
    ({"latents": (32, 8)}, "needs its spatial latent: set model.network_options.latent_channels"),
    ({"latents": (32, 7), "network_options": {"latent_channels": 2, "stages": 1, "width": 4}},
     "layer z2 has 7 numbers, not a whole number of channels at its 2x2 grid"),
    ({"latents": (16, 8), "network_options": {"latent_channels": 2, "stages": 1, "width": 4}},
     r"model.latents\[0\] = 16 must be z1's size"),
])
def test_a_residual_stack_that_does_not_fit_its_grids_is_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        build_vae(ModelConfig(network="resnet", likelihood="discretized_logistic", **fields), COLOUR)
    with pytest.raises(ConfigError, match="the residual stack's guide is top-down"):
        resolve_parts(ModelConfig(latents=(32, 8), network="resnet", inference="bottom_up"))


@pytest.mark.parametrize("name", ["cifar10_ladder.toml", "cifar10_ladder_residual.toml", "cifar10_ladder_free_bits.toml",
                                  "cifar10_ladder_skip.toml", "cifar10_ladder_narrow.toml",
                                  "lfw_ladder.toml"])
def test_the_shipped_ladder_configs_build_and_score_a_batch(name):
    from pathlib import Path

    config = Config.load(Path(__file__).resolve().parents[1] / "experiments" / "configs" / name)
    shape = (3, 32, 32) if name.startswith("cifar") else (3, 64, 64)
    vae = build_vae(config.model, shape)
    x = torch.randint(0, 256, (2, *shape), generator=torch.Generator().manual_seed(0)).float() / 255
    assert isinstance(vae, HierarchicalVAE) and vae.latents == tuple(config.model.latents) and len(vae.latents) == 3
    assert torch.isfinite(build_objective(config.train.objective, vae, free_bits=config.train.free_bits)(x))


def test_the_lfw_ladder_config_trains_end_to_end_on_a_synthetic_tree(tmp_path):
    from pathlib import Path

    from helpers import lfw_tree
    from pyrovae.runs import train_run

    root = lfw_tree(tmp_path / "data", "torchvision", n_train=4, n_test=2, per_person=3)
    tiny = [f"data.data_dir={root}", "data.image_size=16", "model.z_dim=32", "model.latents=[32, 8, 4]",
            "model.network_options.latent_channels=2", "model.network_options.width=4",
            "model.likelihood_options.components=2", "train.epochs=1", "train.batch_size=4", "train.device=cpu"]
    config = Config.load(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "lfw_ladder.toml", tiny)
    trained = train_run(config, tmp_path / "run", quiet=True)
    assert math.isfinite(trained.metrics["epochs"][-1]["test_bits_per_dim"]) and trained.vae.inference == "top_down_residual"
    for name in ("checkpoint.pt", "samples.png", "layers.png", "reconstructions.png"):
        assert (tmp_path / "run" / name).is_file(), name


def test_a_vamp_prior_on_a_bottom_up_stack_mixes_q_of_the_top_layer_along_the_guide_means():
    vae = _stack("bottom_up", "vamp")
    u = vae.prior.pseudo_inputs  # (K, 1, 4, 4)
    z1 = vae.posterior.nets[0](u.flatten(1))[0]  # the mean of q(z1 | u)
    loc, scale, _ = vae.posterior.nets[1](z1)
    component = vae.posterior(u)
    torch.testing.assert_close(component.mean, loc)
    torch.testing.assert_close(component.stddev, scale)
    z = torch.randn(7, 2)
    expected = torch.logsumexp(component.log_prob(z.unsqueeze(1)), 1) - math.log(u.shape[0])
    torch.testing.assert_close(vae.prior().log_prob(z), expected, rtol=1e-5, atol=1e-5)


# --- the decoder that reads the top-down path ---------------------------------------------------------
@pytest.mark.parametrize("build", [lambda skip: _stack("top_down_residual", latents=(3, 2, 2), skip=skip),
                                   lambda skip: _resnet_stack(skip=skip)], ids=["mlp", "resnet"])
def test_a_skip_with_zero_weights_is_the_stack_without_it(build):
    """The skip only adds to the decoder's first layer: zeroed, the model is the plain stack with the
    same weights, so every objective gives the same loss and the same gradients for the shared weights."""
    plain, skipped = build(False), build(True)
    missing, unexpected = skipped.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("skip.") for name in missing)
    with torch.no_grad():
        for name, p in skipped.skip.named_parameters():
            if not name.endswith("original1"):  # a weight-normed convolution: zero its norm, keep the direction
                p.zero_()
    x = _colour_images() if plain.image_shape[0] == 3 else _images()
    for name in ("meanfield", "manual_mc"):
        a = _loss_and_grads(build_objective(name, plain), plain, x)
        b = _loss_and_grads(build_objective(name, skipped), skipped, x)
        _assert_same(a, (b[0], {k: v for k, v in b[1].items() if not k.startswith("skip.")}), rtol=1e-6)
    assert skipped.encode(x).shape[-1] == plain.latents[0] + plain.latents[1]
    torch.testing.assert_close(skipped.reconstruct(x), plain.reconstruct(x))


@pytest.mark.parametrize("skip", [False, True])
def test_with_the_skip_the_upper_layer_reaches_the_data_past_z1(skip):
    """log p(x | z1, h(z2)) moves with z2 at a fixed z1 exactly when the decoder reads the path; the
    code the decoder reads (encode, decode, sample) carries z2 then."""
    vae, x = _stack("top_down_residual", skip=skip), _images()
    z1, z2 = torch.randn(5, 3), torch.randn(5, 2)
    code = vae._code
    moved = vae.outputs(code(z1, z2 + 1.0)) - vae.outputs(code(z1, z2))
    assert (moved.abs().max() > 1e-4) == skip
    layers = vae.encode_layers(x)
    torch.testing.assert_close(vae.encode(x), code(layers["z1"], layers["z2"]))
    assert vae.sample_layers(4).shape == (4, 3 + 2 * skip) and vae.sample(4).shape == (4, *SHAPE)


@pytest.mark.parametrize("inference", EXACT)
def test_a_linear_gaussian_stack_with_the_skip_has_the_exact_log_likelihood(inference):
    """x = B z1 + C z2 + b + noise, z1 = A z2 + a + noise: Gaussian, so log p(x) is closed-form. The
    guide is the exact posterior of the model without the skip (C = 0), no longer exact: the ELBO sits
    strictly below log p(x) and IWAE-20000 closes on it (0.004 nats per image off on these 6 images,
    held to 0.02)."""
    from torch.nn import functional as F

    plain, _ = _linear_gaussian(inference)
    config = ModelConfig(latents=(2, 2), hidden=(), latent_hidden=(), network="mlp", inference=inference,
                         likelihood="normal", likelihood_options={"scale": "fixed", "scale_value": 0.5},
                         decoder_skip=True)
    vae = build_vae(config, (1, 2, 2)).double()
    vae.load_state_dict(plain.state_dict(), strict=False)
    C = torch.tensor([[0.4, 0.0], [0.0, -0.3], [0.2, 0.1], [-0.1, 0.3]], dtype=torch.float64)
    with torch.no_grad():
        vae.skip.weight.copy_(C)
        vae.skip.bias.zero_()
        B, b = vae.decoder.net[0].weight, vae.decoder.net[0].bias
        head = vae.conditionals[0].head
        A, a0, s = head.weight[:2], head.bias[:2], F.softplus(head.bias[2]) + vae.conditionals[0].min_scale
        M = B @ A + C
        cov = M @ M.T + s ** 2 * B @ B.T + 0.25 * torch.eye(4, dtype=torch.float64)
        x = torch.randn(6, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        exact = -MultivariateNormal(B @ a0 + b, covariance_matrix=cov).log_prob(x.flatten(1)).mean().item()
        neg_elbo = -elbo_terms(vae, x)["elbo"].mean().item()
    assert neg_elbo > exact + 0.1
    assert importance_log_likelihood(vae, x, k=20000)["neg_log_likelihood"] == pytest.approx(exact, abs=0.02)
