import json

import pytest

from helpers import ROOT

from pyrovae.build import check_names
from pyrovae.objectives import ESTIMATORS
from pyrovae.config import Config, ConfigError, ModelConfig, TrainConfig
from pyrovae.data import DATASETS
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.networks import NETWORKS
from pyrovae.priors import PRIORS


def test_json_round_trip(tmp_path):
    cfg = Config().replace(model={"z_dim": 2, "hidden": (200, 200)}, train={"lr": 3e-4})
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg
    assert Config.from_dict(json.loads((tmp_path / "c.json").read_text())) == cfg


@pytest.mark.parametrize("section,key,value,needle", [
    ("train", "lr", -1.0, "train.lr must be a positive"),
    ("train", "lr", 0.0, "train.lr must be a positive"),
    ("train", "lr", float("inf"), "train.lr must be a positive"),
    ("train", "lr_decay", 1.5, "train.lr_decay must be a factor in"),
    ("train", "lr_decay", 0.0, "train.lr_decay must be a factor in"),
    ("train", "lr_milestones", (4, 1), "train.lr_milestones must be increasing positive epoch counts"),
    ("train", "lr_milestones", (0,), "train.lr_milestones must be increasing positive epoch counts"),
    ("train", "lr_milestones", (1, "x"), "train.lr_milestones must be increasing positive epoch counts"),
    ("train", "batch_size", 0, "train.batch_size must be a positive integer"),
    ("train", "epochs", -3, "train.epochs must be a positive integer"),
    ("train", "device", "tpu", "auto, cpu, cuda"),
    ("train", "objective", "elbo2", "valid: " + ", ".join(ESTIMATORS)),
    ("train", "implementation", "fast", "unknown implementation 'fast'; valid: traced, pyro, manual"),
    ("model", "z_dim", 0, "model.z_dim must be a positive integer"),
    ("model", "hidden", (), "model.hidden"),
    ("model", "prior", "gaussian", "valid: " + ", ".join(sorted(PRIORS))),
    ("model", "likelihood", "poisson", "valid: " + ", ".join(sorted(LIKELIHOODS))),
    ("model", "activation", "swish", "valid: elu, gelu, relu, softplus, tanh"),
    ("data", "dataset", "imagenet", "valid: " + ", ".join(sorted(DATASETS)) + ", or folder:PATH"),
    ("data", "binarization", "threshold", "valid: dynamic, static"),
])
def test_bad_values_name_the_field_and_the_valid_choices(section, key, value, needle):
    """A type or range is refused when the config is made; a name when it is resolved (check_names,
    which a run calls before it reads data); either way the message names the field."""
    with pytest.raises(ConfigError, match=needle):
        check_names(Config().replace(**{section: {key: value}}))


def test_making_a_config_resolves_no_name_and_loads_nothing(tmp_path):
    """Inert data: a config naming parts, a plugin, a dataset and an objective that do not exist here
    is made, saved and read back without importing torch or the plugin; resolving it names the field."""
    import subprocess
    import sys

    bad = {"model": {"prior": "elsewhere", "plugins": ["no_such_plugin_module"], "prior_options": {"k": 1}},
           "data": {"dataset": "imagenet"}, "train": {"objective": "elbo2", "tensorboard": True}}
    (tmp_path / "c.json").write_text(json.dumps(bad))
    code = ("import sys; from pyrovae.config import Config; c = Config.load(sys.argv[1]); c.save(sys.argv[1]); "
            "print(sorted(m for m in ('torch', 'pyro', 'no_such_plugin_module', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.json")], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
    config = Config.load(tmp_path / "c.json")
    assert config.model.prior == "elsewhere" and config.data.dataset == "imagenet"
    with pytest.raises(ConfigError, match="model.plugins: no plugin module 'no_such_plugin_module'"):
        check_names(config)
    with pytest.raises(ConfigError, match="unknown model.prior 'elsewhere'"):
        check_names(config.replace(model={"plugins": ()}))


def test_unknown_keys_are_listed():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['zdim'\] in config section 'model'; valid: z_dim"):
        Config.from_dict({"model": {"zdim": 2}})
    with pytest.raises(ConfigError, match="unknown config section"):
        Config.from_dict({"optim": {}})


def test_sections_validate_on_their_own():
    with pytest.raises(ConfigError):
        ModelConfig(z_dim=-1)
    with pytest.raises(ConfigError):
        TrainConfig(lr=float("nan"))


def test_unknown_component_options_are_refused_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['components'\] in model.prior_options"):
        check_names(Config().replace(model={"prior_options": {"components": 3}}))
    with pytest.raises(ConfigError, match="must be a mapping"):
        Config().replace(model={"posterior_options": [1, 2]})
    with pytest.raises(ConfigError, match="unknown model.network 'transformer'; valid: auto, " + ", ".join(sorted(NETWORKS))):
        check_names(Config().replace(model={"network": "transformer"}))


def test_lr_milestones_read_from_toml_lists():
    cfg = Config.from_dict({"train": {"lr_decay": 0.5, "lr_milestones": [1, 4, 13]}})
    assert cfg.train.lr_milestones == (1, 4, 13)
    assert Config.from_dict(cfg.to_dict()) == cfg


IMAGE_SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "lfw": (3, 64, 64)}
CONFIG_FILES = sorted((ROOT / "experiments" / "configs").glob("*.toml"))


def test_the_experiment_configs_are_all_found():
    assert len(CONFIG_FILES) >= 8


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_every_experiment_config_loads_builds_and_scores_a_batch(path):
    """Each shipped config is valid, builds its model and objective, and gives a finite loss."""
    import torch

    from helpers import data_of_kind
    from pyrovae.build import build_vae
    from pyrovae.objectives import build_objective

    config = Config.load(path)
    shape = IMAGE_SHAPES[config.data.dataset]
    if config.data.image_size:
        shape = (shape[0], config.data.image_size, config.data.image_size)
    vae = build_vae(config.model, shape)
    loss = build_objective(config.train.objective, vae, config.train.particles)
    x = data_of_kind(vae.likelihood.data_kind, n=2, shape=shape)
    assert torch.isfinite(loss(x, kl_weight=config.train.kl_weight))
