"""The model/guide pair: trace structure, stock-Pyro compatibility, independence, oracles."""

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.poutine.util import site_is_subsample

from helpers import binary_images
from pyrovae import ModelConfig, PyroELBO, build_vae
from pyrovae.evaluate import elbo_terms
from pyrovae.likelihoods import DataSupportError
from pyrovae.model import ImageShapeError

SMALL = ModelConfig(z_dim=3, hidden=(16,))


def test_model_trace_structure():
    vae = build_vae(SMALL)
    x = binary_images(5)
    tr = poutine.trace(vae.model).get_trace(x)
    tr.compute_log_prob()
    samples = {n: s for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    assert set(samples) == {"z", "x"}
    assert site_is_subsample(tr.nodes["data"]) and tr.nodes["data"]["value"].shape == (5,)
    z, obs = samples["z"], samples["x"]
    assert not z["is_observed"] and obs["is_observed"]
    assert torch.equal(obs["value"], x)
    assert z["fn"].batch_shape == (5,) and z["fn"].event_shape == (3,)
    assert obs["fn"].batch_shape == (5,) and obs["fn"].event_shape == (1, 28, 28)
    assert z["log_prob"].shape == (5,) and obs["log_prob"].shape == (5,)
    for site in (z, obs):
        [frame] = site["cond_indep_stack"]
        assert frame.name == "data" and frame.size == 5 and frame.dim == -1


def test_guide_trace_matches_model_latents():
    vae = build_vae(SMALL)
    x = binary_images(4)
    model_tr = poutine.trace(vae.model).get_trace(x)
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_latents = {n for n, s in model_tr.nodes.items()
                     if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}
    guide_latents = {n for n, s in guide_tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    assert model_latents == guide_latents == {"z"}
    gz, mz = guide_tr.nodes["z"], model_tr.nodes["z"]
    assert gz["fn"].batch_shape == mz["fn"].batch_shape and gz["fn"].event_shape == mz["fn"].event_shape
    assert gz["fn"].has_rsample
    assert (gz["fn"].base_dist.scale > 0).all()


def test_stock_svi_trains_the_pair_and_predictive_works():
    vae = build_vae(SMALL)
    x = binary_images(32)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step(x)
    changed = [k for k, v in vae.state_dict().items() if not torch.equal(v, before[k])]
    trainable = [k for k, _ in vae.named_parameters()]
    assert sorted(changed) == sorted(trainable)
    post = Predictive(vae.model, guide=vae.guide, num_samples=2, return_sites=["z"])(x)
    assert post["z"].shape == (2, 32, 3)


def test_two_models_do_not_share_parameters():
    a, b = build_vae(SMALL), build_vae(SMALL)
    b_before = {k: v.clone() for k, v in b.state_dict().items()}
    svi = SVI(a.model, a.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step(binary_images(16))
    svi_b = SVI(b.model, b.guide, pyro.optim.Adam({"lr": 0.0}), Trace_ELBO())
    svi_b.step(binary_images(16))
    for k, v in b.state_dict().items():
        assert torch.equal(v, b_before[k]), f"{k} of model b changed when model a was trained"
    names = list(pyro.get_param_store().keys())
    a_names = [n for n in names if n.startswith(a._pyro_name + ".")]
    b_names = [n for n in names if n.startswith(b._pyro_name + ".")]
    assert a_names and b_names and len(a_names) + len(b_names) == len(names)


def test_gradients_reach_every_parameter():
    vae = build_vae(SMALL)
    loss = PyroELBO(vae)(binary_images(16))
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_pyro_loss_equals_plain_torch_elbo_under_the_same_noise():
    """Trace_ELBO's single-sample loss is -(log p(x|z) + log p(z) - log q(z|x)) at the guide's z."""
    vae = build_vae(SMALL)
    x = binary_images(16)
    torch.manual_seed(3)
    pyro_loss = PyroELBO(vae)(x)
    torch.manual_seed(3)
    ours = -elbo_terms(vae, x)["elbo"].sum()
    torch.testing.assert_close(pyro_loss, ours, rtol=1e-6, atol=1e-4)


def test_grey_levels_with_bernoulli_likelihood_are_refused():
    vae = build_vae(SMALL)
    grey = torch.rand(4, 1, 28, 28)
    with pytest.raises(DataSupportError, match="(?i)binar"):
        PyroELBO(vae)(grey)
    with pytest.raises(DataSupportError, match="torch.bernoulli"):
        vae.guide(grey)


@pytest.mark.parametrize("shape", [(4, 784), (4, 3, 28, 28), (4, 1, 32, 32)])
def test_wrong_image_shape_is_refused(shape):
    vae = build_vae(SMALL)
    with pytest.raises(ImageShapeError, match=r"\(batch, 1, 28, 28\)"):
        vae.model(torch.zeros(shape))


def test_state_dict_round_trip_gives_identical_outputs():
    a = build_vae(SMALL)
    b = build_vae(SMALL)
    b.load_state_dict(a.state_dict())
    x = binary_images(6)
    assert torch.equal(a.encode(x), b.encode(x))
    assert torch.equal(a.reconstruct(x), b.reconstruct(x))
    torch.manual_seed(1)
    la = PyroELBO(a)(x)
    torch.manual_seed(1)
    lb = PyroELBO(b)(x)
    assert torch.equal(la, lb)


def test_guide_scale_is_bounded_away_from_zero():
    vae = build_vae(SMALL)
    with torch.no_grad():
        for p in vae.posterior.parameters():
            p.fill_(-1e4)  # drives the raw scale to -infinity
    scale = vae.posterior(binary_images(2)).base_dist.scale
    assert (scale >= SMALL.min_scale).all() and torch.isfinite(scale).all()
