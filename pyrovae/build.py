"""Where names become objects: the VAE a :class:`pyrovae.config.ModelConfig` describes.

One stochastic layer (:class:`pyrovae.model.VAE`) unless ``model.latents`` asks for a stack
(:class:`pyrovae.hierarchy.HierarchicalVAE`). Parts are looked up in their registries (``PRIORS``,
``LIKELIHOODS``, ``POSTERIORS``, ``NETWORKS``), which plugins may extend, by
:func:`pyrovae.parts.resolve_parts`.
"""

from __future__ import annotations

from pyrovae.config import Config, ConfigError, ModelConfig, OptionError
from pyrovae.data import check_dataset
from pyrovae.hierarchy import build_hierarchical
from pyrovae.hierarchy_resnet import build_resnet_stack
from pyrovae.model import VAE
from pyrovae.networks import NETWORKS, network_for
from pyrovae.objectives import check_objective
from pyrovae.parts import resolve_parts

__all__ = ["build_vae", "check_names"]


def build_vae(config: ModelConfig, image_shape: tuple[int, ...] = (1, 28, 28)) -> VAE:
    """Build the VAE a :class:`ModelConfig` describes: the one place where names become objects.

    A part that refuses its options (a value out of range, or one that does not suit the image shape)
    raises :class:`pyrovae.config.ConfigError` naming the config field: the option itself
    (``model.prior_options.bins``) where the part raised :class:`pyrovae.config.OptionError`.
    """
    c, parts = config, resolve_parts(config)
    o = parts.options
    likelihood = _part("likelihood", c.likelihood, o["likelihood"],
                       lambda: parts.likelihood.build(image_shape, **o["likelihood"]))
    if c.latents:
        build = build_resnet_stack if c.network == "resnet" else build_hierarchical
        return build(c, image_shape, likelihood, lambda z_dim, posterior: _part(
            "prior", c.prior, o["prior"], lambda: parts.prior.build(
                z_dim, posterior=posterior, image_shape=image_shape, **o["prior"])))
    network = network_for(image_shape) if c.network == "auto" else c.network
    encoder, decoder = _part("network", network, o["network"], lambda: NETWORKS[network](
        image_shape, c.z_dim, image_shape[0] * likelihood.outputs_per_pixel,
        hidden=c.hidden, activation=c.activation, min_scale=c.min_scale, **o["network"]))
    posterior = _part("posterior", c.posterior, o["posterior"],
                      lambda: parts.posterior.build(encoder, c.z_dim, **o["posterior"]))
    prior = _part("prior", c.prior, o["prior"], lambda: parts.prior.build(
        c.z_dim, posterior=posterior, image_shape=image_shape, **o["prior"]))
    return VAE(prior=prior, decoder=decoder, likelihood=likelihood, posterior=posterior, image_shape=image_shape)


def check_names(config: Config) -> None:
    """Every name a run resolves, resolved now (plugins loaded): its parts and their options, its
    dataset and its objective; a :class:`ConfigError` naming the field for the first that fails.
    A run calls this before it reads any data."""
    resolve_parts(config.model)
    check_dataset(config.data.dataset)
    check_objective(config.train)


def _part(kind: str, name: str, options: dict, make):
    try:
        return make()
    except OptionError as e:
        raise ConfigError(f"model.{kind} {name!r}: model.{kind}_options.{e}") from None
    except (ValueError, TypeError) as e:
        given = f" with model.{kind}_options {options}" if options else ""
        raise ConfigError(f"model.{kind} {name!r}{given} cannot be built: {e}") from None
