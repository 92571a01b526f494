"""Configuration: frozen dataclasses of plain data, saved as JSON next to every run.

Every field is an :func:`option`: its default, its documentation and the flag (if any) that sets it.
``Config.from_dict`` rejects unknown keys, values of the wrong type and values out of range with a
:class:`ConfigError` that names the field and says what is valid.
Making or loading a config does nothing else: names (priors, likelihoods, plugins, datasets,
objectives) are looked up where they become objects (:mod:`pyrovae.parts`, :mod:`pyrovae.data`,
:mod:`pyrovae.objectives`), before any data are read, and optional features (tensorboard) are checked
where they are used. So a saved run always loads, whatever is installed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyrovae.options import ConfigError, OptionError, option_int, option_number, option_widths  # noqa: F401

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "OptionError", "ModelConfig", "DataConfig", "TrainConfig", "Config", "OLD_NAMES", "option",
           "option_int", "option_number", "option_widths"]


#: The guides of a stack of stochastic layers (``model.inference``): see :mod:`pyrovae.hierarchy`.
INFERENCES = ("top_down", "top_down_residual", "bottom_up")
#: How MNIST's grey levels become the binary training images (``data.binarization``): see :mod:`pyrovae.data`.
BINARIZATIONS = ("dynamic", "static")
#: Objective names of earlier versions: name -> (``train.objective``, ``train.implementation``). Read with a
#: note that names the new pair; the pairs themselves are pyrovae.objectives.OBJECTIVES.
OLD_NAMES = {
    "trace_elbo": ("elbo", "pyro"),
    "meanfield_elbo": ("meanfield", "pyro"),
    "manual_mc": ("elbo", "manual"),
    "manual_analytic": ("meanfield", "manual"),
    "manual_iwae": ("iwae", "manual"),
}


def option(default, doc: str, *, flag: bool | str = False):
    """A config field: its default, its one-line documentation (also the ``--help`` text), and the
    ``pyrovae train`` flag that sets it (True: ``--the-field-name``; a string: that flag; False: none,
    ``--set`` reaches it). :mod:`pyrovae.cli` builds its flags from these."""
    metadata = {"doc": doc, "flag": flag}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelConfig:
    z_dim: int = option(50, "size of the latent code z", flag=True)
    hidden: tuple[int, ...] = option((400,), "hidden-layer widths of the encoder and of the decoder (mirrored)",
                                     flag=True)
    activation: str = option("softplus", "hidden nonlinearity: see pyrovae.networks.ACTIVATIONS", flag=True)
    prior: str = option("normal", "p(z): see pyrovae.priors.PRIORS", flag=True)
    likelihood: str = option("bernoulli", "p(x|z): see pyrovae.likelihoods.LIKELIHOODS", flag=True)
    posterior: str = option("diagonal", "q(z|x), the guide's family: see pyrovae.posteriors.POSTERIORS", flag=True)
    network: str = option("auto", "encoder/decoder: see pyrovae.networks.NETWORKS; auto picks by image shape",
                          flag=True)
    min_scale: float = option(1e-4, "lower bound on the encoder's standard deviations")
    prior_options: dict = option({}, "keyword options of the prior, e.g. {\"components\": 10}")
    likelihood_options: dict = option({}, "keyword options of the likelihood")
    posterior_options: dict = option({}, "keyword options of the posterior, e.g. {\"flows\": 2}")
    network_options: dict = option({}, "keyword options of the network builder")
    plugins: tuple[str, ...] = option((), "modules to import first; they add parts by name (see pyrovae.plugins)",
                                      flag="--plugin")
    latents: tuple[int, ...] = option((), "sizes of a stack of stochastic layers z1 (next to x) .. zL, e.g. [100, "
                                          "50]; replaces z_dim (set to latents[0]); empty: one layer of z_dim (see "
                                          "pyrovae.hierarchy)", flag=True)
    inference: str = option("top_down_residual", "the stack's guide: top_down_residual (NVAE's residual "
                                                 "Gaussians), top_down (Ladder VAE, precision-weighted) or "
                                                 "bottom_up (Burda et al.)",
                            flag=True)
    latent_hidden: tuple[int, ...] | None = option(None, "hidden widths between two latent layers; None: two layers "
                                                         "as wide as the lower one; empty: affine")
    decoder_skip: bool = option(False, "a stack's decoder also reads the top-down path, the features of p(z1 | z2): "
                                       "p(x | z1, h(z2)) as in NVAE and Tomczak and Welling's HVAE")

    def __post_init__(self) -> None:  # types and ranges only: names meet their registries in pyrovae.parts
        if not isinstance(self.plugins, tuple) or not all(isinstance(m, str) and m for m in self.plugins):
            raise ConfigError(f"model.plugins must be a list of module names, got {self.plugins!r}")
        if not isinstance(self.z_dim, int) or self.z_dim < 1:
            raise ConfigError(f"model.z_dim must be a positive integer (the latent size), got {self.z_dim!r}")
        linear = self.network == "mlp" and self.hidden == ()  # no hidden layer: an affine encoder and decoder
        if not isinstance(self.hidden, tuple) or not (self.hidden or linear) or any(
                isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigError(f"model.hidden must be one or more positive layer widths, e.g. 400 or 200,200 "
                              f"(or empty with model.network = 'mlp', for a linear VAE); got {self.hidden!r}")
        for key in ("activation", "prior", "likelihood", "posterior", "network"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"model.{key} must be a name, got {getattr(self, key)!r}")
            if not isinstance(getattr(self, f"{key}_options", {}), dict):
                raise ConfigError(f"model.{key}_options must be a mapping of option names to values, got "
                                  f"{getattr(self, f'{key}_options')!r}")
        _check_stack(self)
        scale = self.min_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
            raise ConfigError(f"model.min_scale must be a positive finite number such as 1e-4, got {scale!r}")


def _check_stack(c: ModelConfig) -> None:
    """The fields of a stack of stochastic layers (pyrovae.hierarchy); sets z_dim to the lowest layer's size."""
    if not isinstance(c.latents, tuple) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                               for n in c.latents) or len(c.latents) == 1:
        raise ConfigError(f"model.latents must be two or more positive layer sizes, bottom first (e.g. [100, 50]), "
                          f"or empty for one layer of model.z_dim; got {c.latents!r}")
    if c.inference not in INFERENCES:
        raise ConfigError(f"unknown model.inference {c.inference!r}; valid: {', '.join(INFERENCES)}")
    widths = c.latent_hidden
    if widths is not None and (not isinstance(widths, tuple) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in widths)):
        raise ConfigError(f"model.latent_hidden must be hidden widths such as [100, 100], empty for affine maps, or "
                          f"None; got {widths!r}")
    if not isinstance(c.decoder_skip, bool) or (c.decoder_skip and not c.latents):
        raise ConfigError(f"model.decoder_skip must be true or false, and true only for a stack of layers "
                          f"(model.latents such as [100, 50]); got {c.decoder_skip!r} with latents {c.latents!r}")
    if c.latents:
        object.__setattr__(c, "z_dim", c.latents[0])


@dataclass(frozen=True)
class DataConfig:
    dataset: str = option("mnist", "mnist, fashion_mnist, cifar10, lfw, or folder:PATH (any folder of images)",
                          flag=True)
    data_dir: str | None = option(None, "data root; None: $PYROVAE_DATA, else the user cache folder", flag=True)
    binarization: str = option("dynamic", "MNIST training binarization: dynamic (fresh draw per use) or static",
                               flag=True)
    test_binarization_seed: int = option(0, "the one fixed draw of the binarized test set")
    image_size: int | None = option(None, "resize and centre-crop every image to this square size; None: as stored",
                                    flag=True)

    def __post_init__(self) -> None:  # the dataset's name meets its loaders in pyrovae.data.check_dataset
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError(f"data.dataset must be a name (mnist, fashion_mnist, cifar10, lfw) or folder:PATH, got "
                              f"{self.dataset!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 4):
            raise ConfigError(f"data.image_size must be an integer of at least 4, or None; got {self.image_size!r}")
        if self.binarization not in BINARIZATIONS:
            raise ConfigError(f"unknown data.binarization {self.binarization!r}; valid: {', '.join(BINARIZATIONS)}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = option(20, "passes over the training set", flag=True)
    batch_size: int = option(256, "images per SVI step", flag=True)
    lr: float = option(1e-3, "Adam learning rate (at the start)", flag=True)
    lr_decay: float = option(1.0, "multiply the learning rate by this after each epoch count in lr_milestones")
    lr_milestones: tuple[int, ...] = option((), "epoch counts at which lr_decay applies, e.g. Burda et al. (2015): "
                                                "lr_decay = 10^(-1/7) after 1, 4, 13, 40, 121, 364, 1093 epochs "
                                                "(stages of 3^i epochs)")
    seed: int = option(0, "seeds initialization, reparameterization noise, data order and binarization", flag=True)
    device: str = option("auto", "auto (CUDA when present), cpu or cuda", flag=True)
    objective: str = option("meanfield", "the estimator: meanfield (the ELBO, closed-form KL where one exists), elbo "
                                         "(the ELBO, one-draw KL), iwae (the IWAE bound, train.particles), iwae_dreg "
                                         "(IWAE, DReG gradients)", flag=True)
    implementation: str = option("traced", "traced (ours, from Pyro's traces, no host read), pyro (Pyro's own "
                                           "estimator, the reference) or manual (the hand-coded ELBO in plain "
                                           "PyTorch); see pyrovae.objectives.OBJECTIVES", flag=True)
    particles: int = option(5, "K, importance samples per image for the iwae objectives (ignored by the others)",
                            flag=True)
    kl_weight: float = option(1.0, "beta: weight of the KL term (beta-VAE, Higgins et al. 2017); 1 is the ELBO",
                              flag=True)
    kl_warmup_steps: int = option(0, "raise the KL weight linearly to kl_weight over these steps (k/N at step k); 0: "
                                     "none", flag=True)
    free_bits: float = option(0.0, "nats per image below which a latent layer's KL term (its batch mean) is not "
                                   "pressed further (Kingma et al. 2016); objective meanfield only; 0: off")
    grad_clip: float | None = option(None, "clip the gradient norm to this value; None: no clipping", flag=True)
    skip_grad_norm: float | None = option(None, "skip the update of a step whose gradient norm exceeds this (VDVAE's "
                                                "guard for deep latents, Child 2021), counted per epoch in "
                                                "metrics.json; None: never")
    max_steps: int | None = option(None, "stop after this many optimizer steps in all (quick checks); None: no cap",
                                   flag=True)
    max_seconds: float | None = option(None, "stop, with a checkpoint, once this much wall-clock time (this command's "
                                             "training loop) is spent; resumable like any stop. None: no limit",
                                       flag=True)
    checkpoint_every_steps: int | None = option(None, "also checkpoint every N steps within an epoch; None: per "
                                                      "epoch", flag="--checkpoint-every")
    log_every_steps: int = option(100, "read the loss and the non-finite flags back from the device every N steps")
    train_subset: int | None = option(None, "train on the first N images only (quick checks); None: all", flag=True)
    test_subset: int | None = option(None, "evaluate on the first N test images only; None: all", flag=True)
    tensorboard: bool = option(False, "also log to <run>/tensorboard (pip install 'pyrovae[tensorboard]')", flag=True)
    compile: bool | str = option("auto", "trace the step (loss, gradients, guard) below Python and compile it "
                                         "(pyrovae.compiled.TracedLoss): "
                                         "auto (on the CPU, for runs long enough to win the compilation back) or "
                                         "true; false: eager")
    matmul: str = option("auto", "the CPU's library for the linear layers' products, forward and backward: auto "
                                 "(measured on the run's own step at start-up, for runs of 2,000 steps or more; "
                                 "see pyrovae.matmul), blas (torch's default) or onednn")
    cuda_graph: bool | str = option("auto", "on CUDA, capture the whole step once as a CUDA graph and replay it: auto "
                                            "(wherever the step can be captured) or true; false: eager steps")

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "log_every_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{key} must be a positive integer, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < float("inf"):
            raise ConfigError(f"train.lr must be a positive learning rate such as 1e-3, got {self.lr!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be one of auto, cpu, cuda; got {self.device!r}")
        self._resolve_objective()
        for key in ("grad_clip", "skip_grad_norm"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0 < value < float("inf"))):
                raise ConfigError(f"train.{key} must be a positive number or None, got {value!r}")
        if not isinstance(self.particles, int) or self.particles < 1:
            raise ConfigError(f"train.particles (K) must be a positive integer, got {self.particles!r}")
        if not isinstance(self.kl_weight, (int, float)) or not self.kl_weight > 0 or self.kl_weight == float("inf"):
            raise ConfigError(f"train.kl_weight must be a positive finite number, got {self.kl_weight!r}")
        if not isinstance(self.lr_decay, (int, float)) or not 0 < self.lr_decay <= 1:
            raise ConfigError(f"train.lr_decay must be a factor in (0, 1], got {self.lr_decay!r}")
        milestones = self.lr_milestones
        counts = isinstance(milestones, tuple) and all(isinstance(m, int) and m >= 1 for m in milestones)
        if not counts or list(milestones) != sorted(set(milestones)):
            raise ConfigError(f"train.lr_milestones must be increasing positive epoch counts such as [1, 4, 13], "
                              f"got {milestones!r}")
        if isinstance(self.free_bits, bool) or not isinstance(self.free_bits, (int, float)) or not (
                0 <= self.free_bits < float("inf")):
            raise ConfigError(f"train.free_bits must be a number of nats >= 0 (e.g. 0.5), got {self.free_bits!r}")
        if not isinstance(self.kl_warmup_steps, int) or self.kl_warmup_steps < 0:
            raise ConfigError(f"train.kl_warmup_steps must be an integer >= 0, got {self.kl_warmup_steps!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 63 - 1:
            raise ConfigError(f"train.seed must be an integer from 0 to 2**63 - 2, got {self.seed!r}")
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(f"train.tensorboard must be true or false, got {self.tensorboard!r}")
        if self.matmul not in ("auto", "blas", "onednn"):
            raise ConfigError(f"train.matmul must be one of auto, blas, onednn; got {self.matmul!r}")
        for key in ("compile", "cuda_graph"):
            value = getattr(self, key)
            if not (isinstance(value, bool) or value == "auto"):
                raise ConfigError(f"train.{key} must be auto, true or false, got {value!r}")
        if self.max_seconds is not None and (isinstance(self.max_seconds, bool) or not isinstance(
                self.max_seconds, (int, float)) or not 0 < self.max_seconds < float("inf")):
            raise ConfigError(f"train.max_seconds must be a positive number of seconds or None, got "
                              f"{self.max_seconds!r}")
        for key in ("max_steps", "checkpoint_every_steps", "train_subset", "test_subset"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"train.{key} must be a positive integer or None, got {value!r}")


    def _resolve_objective(self) -> None:
        """Split an earlier one-word objective name into its estimator and implementation, keeping a note
        (``old_name_note``) that names the new ones. Whether the pair exists is the objective registry's
        to say (pyrovae.objectives.check_objective)."""
        if not isinstance(self.objective, str) or not isinstance(self.implementation, str):
            raise ConfigError(f"train.objective and train.implementation are names, got {self.objective!r} and "
                              f"{self.implementation!r}")
        if self.objective not in OLD_NAMES:
            return
        estimator, implementation = OLD_NAMES[self.objective]
        if self.implementation not in ("traced", implementation):
            raise ConfigError(f"train.objective {self.objective!r} is {estimator!r} implemented by {implementation!r}, "
                              f"which contradicts train.implementation {self.implementation!r}")
        object.__setattr__(self, "old_name_note", f"note: train.objective {self.objective!r} is now train.objective "
                                                  f"= {estimator!r} with train.implementation = {implementation!r}")
        object.__setattr__(self, "objective", estimator)
        object.__setattr__(self, "implementation", implementation)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # the VAE: networks, prior, likelihood, posterior
    data: DataConfig = field(default_factory=DataConfig)  # what to train on and where it lives
    train: TrainConfig = field(default_factory=TrainConfig)  # optimization and bookkeeping

    # --- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of sections, got {type(d).__name__}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; valid: {', '.join(sections)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            section_cls = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}[f.name]
            kwargs[f.name] = _section_from_dict(section_cls, f.name, d.get(f.name, {}))
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> "Config":
        """Read a ``.toml`` or ``.json`` config file, then apply ``section.key=value`` overrides."""
        return cls.from_dict(apply_overrides(read_config_file(path), overrides))

    def replace(self, **sections: dict[str, Any]) -> "Config":
        """A copy with some fields changed, e.g. ``cfg.replace(train={"epochs": 5})``."""
        return Config(**{
            f.name: dataclasses.replace(getattr(self, f.name), **sections.get(f.name, {}))
            for f in dataclasses.fields(self)
        })


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a TOML or JSON config file, with a clear error for a missing or broken one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file at {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path} is not a valid {'JSON' if path.suffix == '.json' else 'TOML'} file: {e}") from None


def parse_value(text: str) -> Any:
    """A command-line value read as TOML (numbers, booleans, lists, quoted strings), else a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(d: dict[str, Any], overrides) -> dict[str, Any]:
    """``d`` with ``section.key=value`` (or ``section.key.option=value``) overrides applied."""
    d = json.loads(json.dumps(d))  # a deep copy
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"an override must look like section.key=value (e.g. model.prior=vamp), got {item!r}")
        node = d
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {key}: {part} is not a section or an options mapping")
        node[parts[-1]] = parse_value(value.strip())
    return d


#: Keys that have a new name: (section, old key) -> new key.
RENAMED = {("model", "guide"): "posterior", ("model", "guide_options"): "posterior_options"}


def _section_from_dict(section_cls, name: str, d: dict[str, Any]):
    if not isinstance(d, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(d) - set(fields)
    renamed = {k: RENAMED[name, k] for k in sorted(unknown) if (name, k) in RENAMED}
    if renamed:
        raise ConfigError("; ".join(f"{name}.{old} is now {name}.{new}" for old, new in renamed.items()) +
                          ": rename the key(s) in the config")
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in config section {name!r}; valid: {', '.join(fields)}")
    d = dict(d)
    for key in (f.name for f in fields.values() if f.type.startswith("tuple")):  # lists (or one value) in TOML/JSON
        if isinstance(d.get(key), list):
            d[key] = tuple(d[key])
        elif isinstance(d.get(key), (int, str)):
            d[key] = (d[key],)
    try:
        return section_cls(**d)
    except TypeError as e:
        raise ConfigError(f"config section {name!r}: {e}") from None
