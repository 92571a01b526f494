"""Every guide in the registry: shapes, reparameterized draws, log q of its own draws, normalization,
draws against the density, gradients, devices.

Driven by ``POSTERIORS``: a new guide is tested here without editing this file.
"""

import pytest
import torch

from pyrovae.posteriors import POSTERIORS, IAFPosterior
from pyrovae.networks import MLPEncoder
from helpers import grid_2d, ks_distance

NAMES = sorted(POSTERIORS)
IMAGE_SHAPE = (1, 4, 4)


def make_guide(name, z_dim=3, seed=0, **options):
    torch.manual_seed(seed)
    return POSTERIORS[name].build(MLPEncoder(IMAGE_SHAPE, z_dim, (16,)), z_dim, **options)


def images(n=5, seed=0):
    return torch.bernoulli(torch.full((n, *IMAGE_SHAPE), 0.4), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_reparameterized_draws(name):
    guide = make_guide(name)
    q = guide(images(5))
    assert q.batch_shape == (5,) and q.event_shape == (3,) and q.has_rsample
    z = q.rsample()
    assert z.shape == (5, 3) and z.requires_grad
    lp = q.log_prob(z)
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    assert q.rsample((2,)).shape == (2, 5, 3)
    loc = guide.location(images(5))
    assert loc.shape == (5, 3) and torch.isfinite(loc).all()


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_of_its_own_draws_equals_a_fresh_evaluation(name):
    """log q(z|x) of a draw (which a flow may take from its cache) equals log q of the same values
    scored afresh (inverting a flow)."""
    guide = make_guide(name)
    x = images(5)
    q = guide(x)
    z = q.rsample()
    own = q.log_prob(z)
    fresh = guide(x).log_prob(z.detach().clone())
    torch.testing.assert_close(own, fresh, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_density_is_normalized_and_draws_follow_it(name):
    """For z_dim = 2 and one image: a Riemann sum of q(z|x) over [-8, 8]^2 is 1, and the first
    coordinate of 4000 draws follows the marginal CDF of q (Kolmogorov-Smirnov)."""
    guide = make_guide(name, z_dim=2)
    step = 0.04
    g, z = grid_2d(8.0, step, dtype=torch.float32)
    x = images(1)
    with torch.no_grad():
        density = guide(x.expand(len(z), *IMAGE_SHAPE)).log_prob(z).double().exp().reshape(len(g), len(g))
        torch.manual_seed(1)
        draws = guide(x).sample((4000,))[:, 0]  # (4000, z_dim)
    assert abs(density.sum().item() * step**2 - 1) < 5e-3
    # 1.63 / sqrt(4000) = 0.026 is the 1% critical value of the KS statistic
    assert ks_distance(draws[:, 0].double(), g.double(), density.sum(1) * step, step) < 0.026


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_guide_parameter(name):
    guide = make_guide(name)
    q = guide(images(5))
    z = q.rsample()
    (z.pow(2).sum() + q.log_prob(z).sum()).backward()
    for pname, param in guide.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"no gradient reaches {pname}"


@pytest.mark.parametrize("name", NAMES)
def test_moves_with_its_module_and_round_trips(name):
    a = make_guide(name, seed=0)
    b = make_guide(name, seed=1)
    b.load_state_dict(a.state_dict())
    x = images(4)
    assert torch.equal(a.location(x), b.location(x))
    torch.manual_seed(2)
    za = a(x).rsample()
    torch.manual_seed(2)
    zb = b(x).rsample()
    assert torch.equal(za, zb)
    a.double()
    q = a(x.double())
    z = q.rsample()
    assert z.dtype == torch.float64 and q.log_prob(z).dtype == torch.float64


def test_iaf_guide_owns_its_flows():
    guide = make_guide("iaf", flows=3, hidden=(12,))
    assert isinstance(guide, IAFPosterior) and len(guide.flows) == 3
    own = {id(p) for p in guide.parameters()}
    assert {id(p) for flow in guide.flows for p in flow.parameters()} <= own
    assert any(k.startswith("flows.2.") for k in guide.state_dict())
    with pytest.raises(ValueError, match="flows"):
        make_guide("iaf", flows=0)
