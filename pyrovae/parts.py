"""Parts by name: where the names in ``model`` (and its ``model.plugins``) meet the registries.

The config only holds names and option mappings; :func:`resolve_parts` loads the plugins, looks each
name up in its registry (``PRIORS``, ``LIKELIHOODS``, ``POSTERIORS``, ``NETWORKS``) and checks the
options against the part's constructor. ``build_vae`` calls it, and a training run calls it before
any data are read, so an unknown name or option is told at once, naming the config field. Nothing
here runs when a config is made or loaded: a saved run loads on a machine without a plugin's extras.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import NamedTuple

from pyrovae.options import ConfigError

__all__ = ["PART_ARGUMENTS", "Parts", "part_options", "resolve_parts"]


class Parts(NamedTuple):
    """The classes a model config names, and their options as the parts receive them (an integer
    given for a float option made a float). ``network`` is None for ``auto`` (chosen by image shape)."""

    prior: type
    likelihood: type
    posterior: type
    network: typing.Any
    options: dict[str, dict]


def resolve_parts(c) -> Parts:
    """The parts a :class:`pyrovae.config.ModelConfig` names, with plugins loaded first; a
    :class:`ConfigError` naming the field for an unknown name, an unknown option, an option of the
    wrong type, or a stack of layers built from parts it cannot take."""
    from pyrovae.likelihoods import LIKELIHOODS
    from pyrovae.networks import ACTIVATIONS, NETWORKS
    from pyrovae.plugins import PluginError, load_plugins
    from pyrovae.posteriors import POSTERIORS
    from pyrovae.priors import PRIORS

    try:
        load_plugins(c.plugins)
    except PluginError as e:
        raise ConfigError(f"model.plugins: {e}") from None
    registries = {"prior": PRIORS, "likelihood": LIKELIHOODS, "posterior": POSTERIORS,
                  "network": {"auto": None, **NETWORKS}}
    for key, registry in [("activation", ACTIVATIONS), *registries.items()]:
        if getattr(c, key) not in registry:
            raise ConfigError(f"unknown model.{key} {getattr(c, key)!r}; valid: {', '.join(sorted(registry))}")
    found = {key: registry[getattr(c, key)] for key, registry in registries.items()}
    options = {key: _check_options(key, getattr(c, f"{key}_options"), cls) for key, cls in found.items()}
    _check_stack_parts(c)
    return Parts(**found, options=options)


def _check_stack_parts(c) -> None:
    """What a stack of stochastic layers (``model.latents``) can be built from."""
    if not c.latents:
        return
    refused = [f"model.{key} = {value!r}" for key, value, allowed in [
        ("network", c.network, ("auto", "mlp", "resnet")), ("posterior", c.posterior, ("diagonal",))]
        if value not in allowed]
    if c.network == "resnet" and c.inference == "bottom_up":
        refused.append("model.network = 'resnet' with model.inference = 'bottom_up' (the residual stack's guide is "
                       "top-down)")
    if refused:
        raise ConfigError(f"a stack of stochastic layers (model.latents) is built from MLPs (network auto or mlp) "
                          f"or the residual network, with diagonal Gaussian layers; it cannot take {'; '.join(refused)}")


#: The arguments ``build_vae`` gives each kind of part itself; the part's other keyword arguments are its
#: options (``model.<kind>_options``).
PART_ARGUMENTS = {
    "prior": {"z_dim", "posterior", "image_shape"},
    "likelihood": {"image_shape"},
    "posterior": {"encoder", "z_dim"},
    "network": {"image_shape", "z_dim", "out_channels", "hidden", "activation", "min_scale"},
}


def _signature(target) -> inspect.Signature:
    fn = target.__init__ if isinstance(target, type) else target
    try:
        return inspect.signature(fn, eval_str=True)
    except (NameError, TypeError):  # annotations that cannot be evaluated: names only
        return inspect.signature(fn)


def part_options(kind: str, target) -> dict[str, inspect.Parameter] | None:
    """The options a part of ``kind`` ("prior", "likelihood", "posterior", "network") takes: its
    constructor's keyword parameters (annotations evaluated where possible) less those ``build_vae``
    passes itself; ``None`` when it takes any keyword (``**options``)."""
    params = _signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n: p for n, p in params.items() if n != "self" and n not in PART_ARGUMENTS[kind]
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def _check_options(kind: str, options, target) -> dict:
    """``model.<kind>_options`` checked against ``target``'s constructor: keyword arguments it accepts,
    each of the type its annotation names; returned with integers given for float options as floats.
    (Ranges are the part's own to check: ``build_vae`` reports them.)"""
    where = f"model.{kind}_options"
    if not isinstance(options, dict):
        raise ConfigError(f"{where} must be a mapping of option names to values, got {options!r}")
    params = part_options(kind, target) if target is not None and options else None
    if params is None:
        return dict(options)
    unknown = sorted(set(options) - set(params))
    if unknown:
        name = getattr(target, "__name__", str(target))
        raise ConfigError(f"unknown option(s) {unknown} in {where} for {name}; valid: {', '.join(params) or 'none'}")
    checked = {}
    for key, value in options.items():
        annotation = params[key].annotation
        if annotation is inspect.Parameter.empty or isinstance(annotation, str):
            checked[key] = value
            continue
        if not _has_type(value, annotation):
            raise ConfigError(f"{where}.{key} must be {_type_name(annotation)}, got {value!r}")
        checked[key] = _as_annotated(value, annotation)
    return checked


def _accepts(annotation, kind: type) -> bool:
    """Whether ``annotation`` is ``kind`` or a union that has ``kind`` among its members."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts(a, kind) for a in typing.get_args(annotation))
    return annotation is kind


def _as_annotated(value, annotation):
    """A config value (one that fits ``annotation``) with every integer the annotation wants as a float
    (``float``, not ``int``) made a float, in lists too: TOML and JSON write 2.0 as 2, and an integer
    would reach torch as an integer tensor. Booleans are left alone."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value) if _accepts(annotation, float) and not _accepts(annotation, int) else value
    if isinstance(value, (list, tuple)):
        members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
            else (annotation,)
        for member in members:
            args = typing.get_args(member)
            if typing.get_origin(member) in (tuple, list) and args and _has_type(value, member):
                return type(value)(_as_annotated(v, args[0]) for v in value)
    return value


def _has_type(value, annotation) -> bool:
    """Whether a config value (TOML/JSON: lists for tuples) fits a simple annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list):
        item = args[0] if args else typing.Any
        return isinstance(value, (list, tuple)) and all(_has_type(v, item) for v in value)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this check does not model: the part checks it


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin in (tuple, list):
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(args[0], 'values') if args else 'values'}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


