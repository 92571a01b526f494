"""Every prior x likelihood x guide in the registries, assembled by ``build_vae`` and trained one step.

Each combination gets tiny random data of its likelihood's kind; the loss must be finite and every
parameter must move. ``build_vae`` must also round-trip through ``state_dict`` for every prior and
guide, and no parameter may belong to two parts (the VampPrior uses the guide without owning it).
"""

import copy
import inspect
import itertools

import pytest
import torch

from pyrovae import ModelConfig, PyroELBO, build_vae
from pyrovae.config import ConfigError
from pyrovae.parts import resolve_parts
from pyrovae.posteriors import POSTERIORS
from pyrovae.likelihoods import LIKELIHOODS, LocationScaleLikelihood
from pyrovae.priors import PRIORS
from helpers import assert_one_step_moves_every_parameter, data_of_kind, small_options

IMAGE_SHAPE = (1, 6, 6)
COMBINATIONS = list(itertools.product(sorted(PRIORS), sorted(LIKELIHOODS), sorted(POSTERIORS)))


def config(prior="normal", likelihood="bernoulli", guide="diagonal") -> ModelConfig:
    return ModelConfig(z_dim=2, hidden=(16,), prior=prior, likelihood=likelihood, posterior=guide,
                       prior_options=small_options(PRIORS[prior]))


@pytest.mark.parametrize("prior,likelihood,guide", COMBINATIONS)
def test_one_svi_step(prior, likelihood, guide):
    torch.manual_seed(0)
    vae = build_vae(config(prior, likelihood, guide), IMAGE_SHAPE)
    assert_one_step_moves_every_parameter(vae, data_of_kind(vae.likelihood.data_kind, n=8, shape=IMAGE_SHAPE))


@pytest.mark.parametrize("prior,guide", list(itertools.product(sorted(PRIORS), sorted(POSTERIORS))))
def test_state_dict_round_trip_and_no_shared_module_counted_twice(prior, guide):
    torch.manual_seed(0)
    a = build_vae(config(prior, guide=guide), IMAGE_SHAPE)
    torch.manual_seed(1)
    b = build_vae(config(prior, guide=guide), IMAGE_SHAPE)
    parts = {}  # parameter -> the parts of the VAE that hold it
    for name, p in a.named_parameters(remove_duplicate=False):
        parts.setdefault(id(p), set()).add(name.split(".")[0])
    assert all(len(holders) == 1 for holders in parts.values()), "two parts of the VAE hold one parameter"
    b.load_state_dict(a.state_dict())
    x = data_of_kind("binary", n=4, shape=IMAGE_SHAPE)
    assert torch.equal(a.encode(x), b.encode(x))
    torch.manual_seed(2)
    loss_a = PyroELBO(a)(x)
    torch.manual_seed(2)
    loss_b = PyroELBO(b)(x)
    assert torch.equal(loss_a, loss_b)
    torch.manual_seed(3)
    samples_a = a.sample(3)
    torch.manual_seed(3)
    assert torch.equal(samples_a, b.sample(3))


def test_vamp_prior_from_a_config():
    vae = build_vae(ModelConfig(z_dim=2, hidden=(16,), prior="vamp", prior_options={"components": 3}), IMAGE_SHAPE)
    assert vae.prior.pseudo_inputs.shape == (3, *IMAGE_SHAPE)
    assert vae.prior.posterior is vae.posterior
    assert not any(k.startswith("prior.posterior") for k in vae.state_dict())
    twin = copy.deepcopy(vae)
    assert twin.prior.posterior is twin.posterior


@pytest.mark.parametrize("key,registry", [("prior", PRIORS), ("likelihood", LIKELIHOODS), ("posterior", POSTERIORS)])
def test_every_part_refuses_unknown_options_and_lists_its_own(key, registry):
    for name, cls in registry.items():
        with pytest.raises(ConfigError, match="no_such_option"):
            resolve_parts(ModelConfig(**{key: name, f"{key}_options": {"no_such_option": 1}}))
        options = [n for n, p in inspect.signature(cls.__init__).parameters.items()
                   if p.default is not inspect.Parameter.empty]
        if options:
            with pytest.raises(ConfigError, match=options[0]):
                resolve_parts(ModelConfig(**{key: name, f"{key}_options": {"no_such_option": 1}}))


@pytest.mark.parametrize("scale", LocationScaleLikelihood.SCALES)
def test_likelihood_options_shape_the_decoder(scale):
    """A per-pixel scale doubles the decoder's outputs; the VAE is built and scored either way."""
    cfg = ModelConfig(z_dim=2, hidden=(16,), likelihood="normal", likelihood_options={"scale": scale})
    vae = build_vae(cfg, IMAGE_SHAPE)
    assert vae.decoder(torch.zeros(1, 2)).shape[1] == vae.likelihood.outputs_per_pixel * IMAGE_SHAPE[0]
    assert torch.isfinite(PyroELBO(vae)(data_of_kind("unit", n=4, shape=IMAGE_SHAPE)))
