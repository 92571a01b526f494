"""The hand-coded ELBO against Pyro's estimators: same loss, same gradients, same training path.

Driven by the registries: every prior x likelihood pair is checked without being named here.
"""

import itertools

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from helpers import binary_images
from pyrovae import ModelConfig, PyroELBO, build_vae
from pyrovae.elbo_manual import ManualELBO
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.priors import PRIORS

PAIRS = list(itertools.product(sorted(PRIORS), sorted(LIKELIHOODS)))
# trajectories: every prior with the default likelihood, every likelihood with the default prior
TRAJECTORY_PAIRS = sorted({(p, ModelConfig.likelihood) for p in PRIORS} | {(ModelConfig.prior, lik) for lik in LIKELIHOODS})
ESTIMATORS = [(Trace_ELBO, "mc"), (TraceMeanField_ELBO, "analytic")]


#: smaller than the defaults, to keep the suite fast; a prior not listed here is tested with its defaults
SMALL_OPTIONS = {"vamp": {"components": 8}, "mog": {"components": 3}, "flow": {"flows": 1, "bins": 4}}


def _twins(prior, likelihood):
    config = ModelConfig(z_dim=4, hidden=(32,), prior=prior, likelihood=likelihood,
                         prior_options=SMALL_OPTIONS.get(prior, {}))
    torch.manual_seed(0)
    a = build_vae(config)
    b = build_vae(config)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("prior,likelihood", PAIRS)
@pytest.mark.parametrize("pyro_elbo,kl", ESTIMATORS, ids=["trace-vs-mc", "meanfield-vs-analytic"])
def test_same_loss_and_gradients_under_the_same_noise(prior, likelihood, pyro_elbo, kl):
    a, b = _twins(prior, likelihood)
    x = binary_images(32)
    torch.manual_seed(7)
    loss_pyro = PyroELBO(a, pyro_elbo())(x)
    loss_pyro.backward()
    torch.manual_seed(7)
    loss_ours = ManualELBO(b, kl=kl)(x)
    loss_ours.backward()
    # float32 rounding of a sum of ~25,000 terms of size ~1: a few ulps of the total
    torch.testing.assert_close(loss_ours, loss_pyro, rtol=2e-6, atol=0)
    grads_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        torch.testing.assert_close(grads_b[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize("prior,likelihood", TRAJECTORY_PAIRS)
@pytest.mark.parametrize("pyro_elbo,kl", ESTIMATORS, ids=["trace-vs-mc", "meanfield-vs-analytic"])
def test_same_training_trajectory(prior, likelihood, pyro_elbo, kl):
    a, b = _twins(prior, likelihood)
    data = binary_images(64, seed=1)
    losses = {}
    for name, vae, loss_fn in [("pyro", a, PyroELBO(a, pyro_elbo())), ("ours", b, ManualELBO(b, kl=kl))]:
        opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
        pyro.set_rng_seed(11)
        losses[name] = []
        for step in range(200):
            x = data[(step * 16) % 64:(step * 16) % 64 + 16]
            loss = loss_fn(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["pyro"]), rtol=1e-4, atol=1e-3)
    params_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        torch.testing.assert_close(params_b[name], p, rtol=1e-4, atol=1e-5, msg=f"{name} after 200 steps")


def test_analytic_kl_removes_the_kl_noise():
    """With a decoder that ignores z, all noise is in the KL term: the analytic estimator has none."""
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(z_dim=4, hidden=(32,)))
    with torch.no_grad():
        vae.decoder.net[-1].weight.zero_()  # p(x|z) no longer depends on z
    x = binary_images(16)
    draws = {kl: torch.stack([ManualELBO(vae, kl=kl)(x).detach() for _ in range(400)]).double()
             for kl in ("mc", "analytic")}
    assert draws["analytic"].var() == 0 and draws["mc"].var() > 0
    se = (draws["mc"].var() / 400).sqrt()  # both estimate the same -ELBO
    assert (draws["mc"].mean() - draws["analytic"][0]).abs() < 5 * se


def test_unknown_kl_estimator_is_refused():
    with pytest.raises(ValueError, match="'analytic' or 'mc'"):
        ManualELBO(build_vae(ModelConfig(z_dim=2, hidden=(8,))), kl="exact")
