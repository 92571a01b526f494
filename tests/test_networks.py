"""Every encoder/decoder pair in the registry: shapes for grey and colour images, the scale floor,
gradients, state round trip; and the convolutional pair in a whole VAE.

Driven by ``NETWORKS``: a new network is tested here without editing this file.
"""

import pytest
import torch

from pyrovae import ModelConfig, PyroELBO, build_vae
from pyrovae.networks import NETWORKS, build_conv, build_mlp, network_for

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


def test_mlp_layers_are_stock_torch_modules_with_the_usual_state_dict():
    """The networks are plain ``nn.Linear`` and ``nn.Softplus``: they compute one function one way
    (faster routes belong to the estimators that want them), and checkpoints keep their keys."""
    from torch import nn

    encoder, decoder = build_mlp((1, 28, 28), 5, 1, hidden=(16,), activation="softplus")
    assert [type(m) for m in (*encoder.body, encoder.act, encoder.head)] == [nn.Linear, nn.Softplus, nn.Linear]
    assert [type(m) for m in decoder.net] == [nn.Linear, nn.Softplus, nn.Linear]
    assert list(encoder.state_dict()) == ["body.0.weight", "body.0.bias", "head.weight", "head.bias"]
    assert list(decoder.state_dict()) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
