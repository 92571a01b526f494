"""Every encoder/decoder pair in the registry: shapes for grey and colour images, the scale floor,
gradients, state round trip; and the convolutional pair in a whole VAE.

Driven by ``NETWORKS``: a new network is tested here without editing this file.
"""

import pytest
import torch

from pyrovae import ModelConfig, PyroELBO, build_vae
from pyrovae.networks import NETWORKS, build_conv, network_for

NAMES = sorted(NETWORKS)
SHAPES = [(1, 28, 28), (3, 32, 32), (1, 15, 13)]


def make(name, image_shape, z_dim=4, out_channels=2, seed=0):
    torch.manual_seed(seed)
    return NETWORKS[name](image_shape, z_dim, out_channels, hidden=(16,), activation="softplus", min_scale=1e-3)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", NAMES)
def test_shapes(name, shape):
    encoder, decoder = make(name, shape, out_channels=2 * shape[0])
    loc, scale = encoder(torch.rand(3, *shape))
    assert loc.shape == scale.shape == (3, 4)
    assert (scale >= 1e-3).all()
    assert decoder(torch.randn(3, 4)).shape == (3, 2 * shape[0], *shape[1:])


@pytest.mark.parametrize("name", NAMES)
def test_scale_is_bounded_away_from_zero(name):
    encoder, _ = make(name, (1, 28, 28))
    with torch.no_grad():
        for p in encoder.parameters():
            p.fill_(-1e4)
    _, scale = encoder(torch.rand(2, 1, 28, 28))
    assert torch.isfinite(scale).all() and (scale >= 1e-3).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    encoder, decoder = make(name, (3, 32, 32), out_channels=3)
    loc, scale = encoder(torch.rand(2, 3, 32, 32))
    decoder(loc + scale).pow(2).sum().backward()
    for part in (encoder, decoder):
        for pname, p in part.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    enc_a, dec_a = make(name, (1, 28, 28), seed=0)
    enc_b, dec_b = make(name, (1, 28, 28), seed=1)
    enc_b.load_state_dict(enc_a.state_dict())
    dec_b.load_state_dict(dec_a.state_dict())
    x, z = torch.rand(2, 1, 28, 28), torch.randn(2, 4)
    assert all(torch.equal(a, b) for a, b in zip(enc_a(x), enc_b(x)))
    assert torch.equal(dec_a(z), dec_b(z))


def test_colour_images_get_the_convolutional_network():
    assert network_for((3, 32, 32)) == "conv"
    assert network_for((1, 28, 28)) == "mlp"


def test_conv_channels_option_and_errors():
    encoder, decoder = build_conv((1, 28, 28), 4, 1, hidden=(16,), channels=(8, 16, 24))
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [8, 16, 24]
    assert decoder(torch.randn(2, 4)).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="channels"):
        build_conv((1, 28, 28), 4, 1, hidden=(16,), channels=())
    with pytest.raises(ValueError, match="at least 8 pixels"):
        build_conv((1, 6, 6), 4, 1, hidden=(16,), channels=(8, 8, 8))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["28x28x1", "32x32x3"])
def test_conv_network_in_a_vae(shape):
    cfg = ModelConfig(z_dim=4, hidden=(16,), network="conv", network_options={"channels": (8, 16)})
    vae = build_vae(cfg, shape)
    x = torch.bernoulli(torch.full((4, *shape), 0.3))
    loss = PyroELBO(vae)(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in vae.parameters())
    assert vae.reconstruct(x).shape == x.shape


def test_linear_without_gradients_is_the_same_product():
    """``networks.Linear`` (oneDNN when no gradient is needed) against float64 and against
    ``F.linear`` with gradients, for 2-D and 3-D inputs."""
    from torch.nn import functional as F

    from pyrovae.networks import Linear

    torch.manual_seed(0)
    layer = Linear(400, 784)
    for x in (torch.randn(300, 400), torch.randn(7, 11, 400), torch.randn(9, 400).t().contiguous().t()):
        reference = F.linear(x.double(), layer.weight.double(), layer.bias.double())
        with torch.no_grad():
            fast = layer(x)
        assert fast.shape == reference.shape and fast.dtype == torch.float32
        torch.testing.assert_close(fast.double(), reference, rtol=1e-5, atol=1e-5)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # with gradients: the stock op
    assert set(layer.state_dict()) == {"weight", "bias"}  # the parameters of nn.Linear, nothing added


def test_softplus_without_gradients_is_softplus():
    from torch.nn import functional as F

    from pyrovae.networks import Softplus

    x = torch.cat([torch.linspace(-120, 120, 100_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, 20.001])])
    with torch.no_grad():
        fast = Softplus()(x)
    torch.testing.assert_close(fast.double(), F.softplus(x.double()), rtol=2e-7, atol=6e-8)
    assert (fast >= 0).all()
    assert torch.equal(Softplus()(x), F.softplus(x))  # with gradients: the stock op


def test_linear_falls_back_to_the_stock_op_where_onednn_fails(monkeypatch):
    from torch.nn import functional as F

    from pyrovae import networks

    def broken(*args):
        raise RuntimeError("no oneDNN kernel for this CPU")

    monkeypatch.setattr(networks, "_ONEDNN", True)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken, raising=False)
    layer = networks.Linear(5, 3)
    x = torch.randn(4, 5)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert networks._ONEDNN is False  # asked once, then the stock op
