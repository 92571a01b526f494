"""The residual network pair (``network = "resnet"``) and Labeled Faces in the Wild (``dataset = "lfw"``).

The network: shapes at 32x32 and 64x64, NHWC inputs, gradients, option errors, and every prior,
likelihood and posterior of the registries built around it. The dataset: a small synthetic tree in
each layout the loader reads, the face crop, the split by person, the message when it is missing,
and ``experiments/configs/lfw.toml`` trained end to end on the synthetic tree.
"""

import itertools
import math

import pytest
import torch

from helpers import (LFW_LAYOUTS, ROOT, assert_one_step_moves_every_parameter, data_of_kind, lfw_people, lfw_tree,
                     small_options, write_jpeg)
from pyrovae import ModelConfig, PyroELBO, build_vae
from pyrovae.config import Config, ConfigError
from pyrovae.parts import resolve_parts
from pyrovae.data import DatasetNotFoundError, lfw_is_test_person, load_dataset
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.networks import NETWORKS, build_resnet, resnet_levels
from pyrovae.posteriors import POSTERIORS
from pyrovae.priors import PRIORS

LFW_CONFIG = ROOT / "experiments" / "configs" / "lfw.toml"


def resnet(image_shape, z_dim=8, out_channels=6, **options):
    torch.manual_seed(0)
    options = {"hidden": (16,), "activation": "elu", "width": 8, "blocks": 1, **options}
    return build_resnet(image_shape, z_dim, out_channels, **options)


# --- the network ----------------------------------------------------------------------------------
def test_resnet_is_in_the_registry():
    assert NETWORKS["resnet"] is build_resnet


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 64, 64), (1, 32, 32)], ids=["32x32x3", "64x64x3", "32x32x1"])
@pytest.mark.parametrize("options", [{}, {"weight_norm": False}, {"batch_norm": True, "weight_norm": False},
                                     {"blocks": 2, "stages": 2}], ids=["default", "plain", "batchnorm", "deeper"])
def test_output_shapes(shape, options):
    encoder, decoder = resnet(shape, out_channels=9 * shape[0], **options)
    loc, scale = encoder(torch.rand(5, *shape))
    assert loc.shape == scale.shape == (5, 8) and (scale > 0).all()
    assert decoder(torch.randn(5, 8)).shape == (5, 9 * shape[0], *shape[1:])
    assert decoder(torch.randn(2, 5, 8)).shape == (2, 5, 9 * shape[0], *shape[1:])  # leading batch dims


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_a_spatial_latent_is_a_feature_map_at_the_coarsest_level(channels_last):
    """z holds c channels at H_L x W_L, channel-major; leading batch dimensions pass through."""
    encoder, decoder = resnet((3, 32, 32), z_dim=3 * 16 * 16, stages=1, latent_channels=3, channels_last=channels_last)
    loc, scale = encoder(torch.rand(5, 3, 32, 32))
    assert loc.shape == scale.shape == (5, 768) and (scale > 0).all()
    assert decoder(torch.randn(2, 5, 768)).shape == (2, 5, 6, 32, 32)
    assert not any(isinstance(m, torch.nn.Linear) for m in [*encoder.modules(), *decoder.modules()])


def test_a_spatial_latent_is_local():
    """An exact oracle for the layout: a latent at one corner of the 8x8 map cannot reach the far corner
    of the 32x32 image through the decoder's few 3x3 convolutions, and a pixel at one corner cannot
    reach the far corner's latents through the encoder's, while it does reach its own corner's."""
    encoder, decoder = resnet((3, 32, 32), z_dim=2 * 8 * 8, stages=2, latent_channels=2)
    z = torch.randn(1, 128)
    moved = z.clone()
    moved[0, 0] += 3.0  # channel 0, position (0, 0)
    out, out_moved = decoder(z), decoder(moved)
    assert torch.equal(out[..., 25:, 25:], out_moved[..., 25:, 25:])
    assert not torch.equal(out[..., :4, :4], out_moved[..., :4, :4])
    x = torch.rand(1, 3, 32, 32)
    changed = x.clone()
    changed[0, :, 0, 0] = 1 - changed[0, :, 0, 0]
    (loc, _), (loc_changed, _) = encoder(x), encoder(changed)
    grid, grid_changed = loc.view(2, 8, 8), loc_changed.view(2, 8, 8)
    assert torch.equal(grid[:, 6:, 6:], grid_changed[:, 6:, 6:])
    assert not torch.equal(grid[:, 0, 0], grid_changed[:, 0, 0])


def test_levels_halve_down_to_four_pixels_by_default():
    assert resnet_levels(32, 32, None) == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert resnet_levels(64, 64, None)[-1] == (4, 4) and len(resnet_levels(64, 64, None)) == 5
    assert resnet_levels(15, 13, None) == [(15, 13), (8, 7), (4, 4)]  # odd sizes round up
    assert resnet_levels(6, 6, None) == [(6, 6)]  # too small to halve: one level
    assert resnet_levels(32, 32, 1) == [(32, 32), (16, 16)]


def test_widths_double_per_level_up_to_max_width():
    encoder, _ = resnet((3, 64, 64), width=8, max_width=32)
    convs = [m for m in encoder.convs.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted({m.out_channels for m in convs}) == [8, 16, 32]


@pytest.mark.parametrize("network_channels_last", [False, True], ids=["nchw-network", "nhwc-network"])
def test_channels_last_inputs_give_the_same_outputs(network_channels_last):
    encoder, decoder = resnet((3, 32, 32), channels_last=network_channels_last)
    x = torch.rand(4, 3, 32, 32)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    for a, b in zip(encoder(x), encoder(nhwc)):
        torch.testing.assert_close(a, b)
    out = decoder(torch.randn(4, 8))
    assert out.shape == (4, 6, 32, 32)
    assert out.is_contiguous(memory_format=torch.channels_last) == network_channels_last


def test_a_channels_last_network_computes_the_same_function():
    x, z = torch.rand(3, 3, 32, 32), torch.randn(3, 8)
    enc_a, dec_a = resnet((3, 32, 32))
    enc_b, dec_b = resnet((3, 32, 32), channels_last=True)
    enc_b.load_state_dict(enc_a.state_dict())
    dec_b.load_state_dict(dec_a.state_dict())
    for a, b in zip(enc_a(x), enc_b(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dec_a(z), dec_b(z), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"weight_norm": False, "batch_norm": True}, {"channels_last": True}],
                         ids=["weightnorm", "batchnorm", "channels_last"])
def test_gradients_reach_every_parameter_at_64x64(options):
    encoder, decoder = resnet((3, 64, 64), out_channels=3, **options)
    loc, scale = encoder(torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    decoder(loc + scale).pow(2).sum().backward()
    for part in (encoder, decoder):
        for name, p in part.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_weight_norm_keeps_a_direction_and_a_length_per_unit():
    encoder, _ = resnet((3, 32, 32))
    names = [n for n, _ in encoder.named_parameters()]
    assert any(n.endswith("parametrizations.weight.original0") for n in names)  # g
    assert any(n.endswith("parametrizations.weight.original1") for n in names)  # v
    plain, _ = resnet((3, 32, 32), weight_norm=False)
    assert not any("parametrizations" in n for n, _ in plain.named_parameters())


@pytest.mark.parametrize("options,needle", [
    ({"width": 0}, "width must be an integer of at least 1, got 0"),
    ({"blocks": 0}, "blocks must be an integer of at least 1, got 0"),
    ({"width": 64, "max_width": 32}, "max_width (32) must be at least width (64)"),
    ({"stages": 9}, "stages must be None (chosen from the image size) or an integer from 0 to 5 for 32x32 images"),
    ({"latent_channels": 0}, "latent_channels must be a positive integer or unset (a flat latent), got 0"),
    ({"latent_channels": 2, "stages": 1}, "a spatial latent of 2 channels at 16x16 (the coarsest level of 32x32 "
                                          "images after 1 halvings) has 512 numbers: set z_dim = 512"),
])
def test_option_values_out_of_range_are_config_errors(options, needle):
    config = ModelConfig(z_dim=4, hidden=(16,), network="resnet", network_options=options)
    with pytest.raises(ConfigError) as info:
        build_vae(config, (3, 32, 32))
    assert needle in str(info.value) and "model.network 'resnet'" in str(info.value)


def test_unknown_and_mistyped_options_are_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['depth'\].*valid: width, blocks, stages"):
        resolve_parts(ModelConfig(network="resnet", network_options={"depth": 3}))
    with pytest.raises(ConfigError, match="weight_norm must be true or false"):
        resolve_parts(ModelConfig(network="resnet", network_options={"weight_norm": "yes"}))
    with pytest.raises(ConfigError, match="width must be an integer"):
        resolve_parts(ModelConfig(network="resnet", network_options={"width": 32.5}))


REGISTRY_SHAPE = (3, 8, 8)  # one halving, to 4x4


@pytest.mark.parametrize("prior,likelihood,posterior",
                         list(itertools.product(sorted(PRIORS), sorted(LIKELIHOODS), sorted(POSTERIORS))))
def test_every_prior_likelihood_and_posterior_train_one_step_with_the_resnet(prior, likelihood, posterior):
    config = ModelConfig(z_dim=2, hidden=(16,), activation="elu", network="resnet", prior=prior,
                         likelihood=likelihood, posterior=posterior, prior_options=small_options(PRIORS[prior]),
                         network_options={"width": 4, "blocks": 1})
    torch.manual_seed(0)
    vae = build_vae(config, REGISTRY_SHAPE)
    assert_one_step_moves_every_parameter(vae, data_of_kind(vae.likelihood.data_kind, n=6, shape=REGISTRY_SHAPE))


SPATIAL_CASES = sorted({(prior, "bernoulli", "diagonal") for prior in PRIORS}
                       | {("normal", likelihood, "diagonal") for likelihood in LIKELIHOODS}
                       | {("normal", "bernoulli", posterior) for posterior in POSTERIORS})


@pytest.mark.parametrize("prior,likelihood,posterior", SPATIAL_CASES)
def test_every_part_trains_one_step_with_a_spatial_latent(prior, likelihood, posterior):
    """Every prior, likelihood and posterior once around the spatial latent (2 channels at 4x4)."""
    config = ModelConfig(z_dim=32, activation="elu", network="resnet", prior=prior, likelihood=likelihood,
                         posterior=posterior, prior_options=small_options(PRIORS[prior]),
                         network_options={"width": 4, "blocks": 1, "latent_channels": 2})
    torch.manual_seed(0)
    vae = build_vae(config, REGISTRY_SHAPE)
    assert_one_step_moves_every_parameter(vae, data_of_kind(vae.likelihood.data_kind, n=6, shape=REGISTRY_SHAPE))


@pytest.mark.parametrize("config_file", ["lfw.toml", "cifar10.toml"])
def test_the_shipped_colour_configs_build_and_score_a_batch(config_file):
    config = Config.load(ROOT / "experiments" / "configs" / config_file)
    size = config.data.image_size or 32
    shape = (3, size, size)
    vae = build_vae(config.model, shape)
    x = data_of_kind(vae.likelihood.data_kind, n=2, shape=shape)
    loss = PyroELBO(vae)(x)
    assert torch.isfinite(loss)
    assert config.model.network == "resnet" and config.model.likelihood == "discretized_logistic"


# --- Labeled Faces in the Wild --------------------------------------------------------------------
@pytest.mark.parametrize("layout", sorted(LFW_LAYOUTS))
def test_lfw_is_read_from_each_layout(tmp_path, layout):
    root = lfw_tree(tmp_path, layout, n_train=3, n_test=2, per_person=2)
    train = load_dataset("lfw", root, train=True)
    test = load_dataset("lfw", root, train=False)
    assert train.images.shape == (6, 3, 64, 64) and test.images.shape == (4, 3, 64, 64)
    assert train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and test.labels.tolist() == [0, 0, 1, 1]  # by person
    assert load_dataset("lfw", root, train=False, image_size=32).images.shape == (4, 3, 32, 32)


def _expected(path, size=64):
    """What the loader should make of one file: the central half, resized with antialiasing."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as im:
        image = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    return F.resize(F.center_crop(image, [125, 125]), [size, size], antialias=True)


def test_lfw_split_is_by_person_and_each_split_holds_exactly_its_people(tmp_path):
    root = lfw_tree(tmp_path, "torchvision", n_train=3, n_test=2, per_person=2)
    train_people, test_people = lfw_people(3, 2)
    folder = root / "lfw-py" / "lfw_funneled"
    for people, train in ((train_people, True), (test_people, False)):
        files = [folder / p / f"{p}_{i:04d}.jpg" for p in sorted(people) for i in (1, 2)]
        expected = torch.stack([_expected(f) for f in files])
        loaded = load_dataset("lfw", root, train=train).images
        assert (loaded.int() - expected.int()).abs().max() <= 1  # the same files, cropped the same way
    assert not set(train_people) & set(test_people)


def test_lfw_split_rule_is_fixed():
    names = ["George_W_Bush", "Colin_Powell", "Tony_Blair", "Serena_Williams", "Aaron_Eckhart"]
    first = [lfw_is_test_person(n) for n in names]
    assert first == [lfw_is_test_person(n) for n in names]  # the same in every process (no salted hash)
    share = sum(lfw_is_test_person(f"Person_{i}") for i in range(5000)) / 5000
    assert 0.08 < share < 0.12  # about one person in ten


def test_lfw_face_crop_keeps_the_central_half(tmp_path):
    """A bright 125x125 centre in a dark frame: after the crop, only the centre is left."""
    train_people, test_people = lfw_people(1, 1)
    for person in train_people + test_people:
        image = torch.full((3, 250, 250), 20, dtype=torch.uint8)
        image[:, 62:188, 62:188] = 200  # the crop is rows and columns 62..186 (125 pixels)
        (tmp_path / "lfw" / person).mkdir(parents=True)
        write_jpeg(image, tmp_path / "lfw" / person / f"{person}_0001.jpg", quality=95)
    faces = load_dataset("lfw", tmp_path, train=True).images.float()
    assert faces.shape == (1, 3, 64, 64)
    assert (faces - 200).abs().mean() < 2 and (faces - 200).abs().max() < 30


def test_lfw_decoding_is_cached_and_deterministic(tmp_path, monkeypatch):
    from pyrovae import data

    root = lfw_tree(tmp_path / "data", "unpacked", n_train=2, n_test=1, per_person=2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = load_dataset("lfw", root, train=True).images
    assert len(list((tmp_path / "cache" / "pyrovae" / "decoded").glob("*.pt"))) == 1
    data._decode_folder.cache_clear()  # read back from the file cache this time
    assert torch.equal(load_dataset("lfw", root, train=True).images, first)
    load_dataset("lfw", root, train=True, image_size=32)  # another size is another cache entry
    assert len(list((tmp_path / "cache" / "pyrovae" / "decoded").glob("*.pt"))) == 2


def test_missing_lfw_is_one_message_that_says_where_to_put_it(tmp_path):
    (tmp_path / "lfw").mkdir()  # an empty folder is as good as none
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("lfw", tmp_path, train=True)
    message = str(info.value)
    for needle in ("Labeled Faces in the Wild", "cannot be downloaded", "lfw-funneled.tgz",
                   str(tmp_path / "lfw-py" / "lfw_funneled" / "<person>" / "<person>_0001.jpg"),
                   str(tmp_path / "lfw" / "<person>" / "<person>_0001.jpg"), "PYROVAE_DATA"):
        assert needle in message


def test_lfw_with_too_few_people_for_a_test_split_says_so(tmp_path):
    lfw_tree(tmp_path, "persons", n_train=2, n_test=0, per_person=1)
    assert load_dataset("lfw", tmp_path, train=True).images.shape[0] == 2
    with pytest.raises(DatasetNotFoundError, match="no test images: the split is by person"):
        load_dataset("lfw", tmp_path, train=False)


def test_the_lfw_config_trains_end_to_end_on_a_synthetic_tree(tmp_path):
    from pyrovae.runs import train_run

    root = lfw_tree(tmp_path / "data", "torchvision", n_train=4, n_test=2, per_person=3)
    tiny = [f"data.data_dir={root}", "data.image_size=16", "model.z_dim=32", "model.network_options.latent_channels=2",
            "model.network_options.width=4", "model.likelihood_options.components=2", "train.epochs=1",
            "train.batch_size=4", "train.device=cpu"]
    config = Config.load(LFW_CONFIG, tiny)
    assert config.data.dataset == "lfw" and config.model.network == "resnet"
    trained = train_run(config, tmp_path / "run", quiet=True)
    last = trained.metrics["epochs"][-1]
    assert last["epoch"] == 1 and math.isfinite(last["test_bits_per_dim"])
    assert trained.data.train.shape == (12, 3, 16, 16) and trained.data.test.shape == (6, 3, 16, 16)
    for name in ("checkpoint.pt", "metrics.json", "samples.png", "reconstructions.png"):
        assert (tmp_path / "run" / name).is_file(), name


def test_the_lfw_command_line_on_missing_data_is_one_message(tmp_path, capsys):
    from pyrovae.cli import main

    code = main(["train", "--config", str(LFW_CONFIG), "--data-dir", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Labeled Faces in the Wild (lfw) was not found" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
