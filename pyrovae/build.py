"""Where names become objects: the VAE a :class:`pyrovae.config.ModelConfig` describes.

One stochastic layer (:class:`pyrovae.model.VAE`) unless ``model.latents`` asks for a stack
(:class:`pyrovae.hierarchy.HierarchicalVAE`). Parts are looked up in their registries (``PRIORS``,
``LIKELIHOODS``, ``POSTERIORS``, ``NETWORKS``), which plugins may extend.
"""

from __future__ import annotations

from pyrovae.config import ConfigError, ModelConfig, OptionError
from pyrovae.hierarchy import build_hierarchical
from pyrovae.hierarchy_resnet import build_resnet_stack
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.model import VAE
from pyrovae.networks import NETWORKS, network_for
from pyrovae.posteriors import POSTERIORS
from pyrovae.priors import PRIORS

__all__ = ["build_vae"]


def build_vae(config: ModelConfig, image_shape: tuple[int, ...] = (1, 28, 28)) -> VAE:
    """Build the VAE a :class:`ModelConfig` describes: the one place where names become objects.

    A part that refuses its options (a value out of range, or one that does not suit the image shape)
    raises :class:`pyrovae.config.ConfigError` naming the config field: the option itself
    (``model.prior_options.bins``) where the part raised :class:`pyrovae.config.OptionError`.
    """
    c = config
    likelihood = _part("likelihood", c.likelihood, c.likelihood_options,
                       lambda: LIKELIHOODS[c.likelihood].build(image_shape, **c.likelihood_options))
    if c.latents:
        build = build_resnet_stack if c.network == "resnet" else build_hierarchical
        return build(c, image_shape, likelihood, lambda z_dim, posterior: _part(
            "prior", c.prior, c.prior_options, lambda: PRIORS[c.prior].build(
                z_dim, posterior=posterior, image_shape=image_shape, **c.prior_options)))
    network = network_for(image_shape) if c.network == "auto" else c.network
    encoder, decoder = _part("network", network, c.network_options, lambda: NETWORKS[network](
        image_shape, c.z_dim, image_shape[0] * likelihood.outputs_per_pixel,
        hidden=c.hidden, activation=c.activation, min_scale=c.min_scale, **c.network_options))
    posterior = _part("posterior", c.posterior, c.posterior_options,
                      lambda: POSTERIORS[c.posterior].build(encoder, c.z_dim, **c.posterior_options))
    prior = _part("prior", c.prior, c.prior_options, lambda: PRIORS[c.prior].build(
        c.z_dim, posterior=posterior, image_shape=image_shape, **c.prior_options))
    return VAE(prior=prior, decoder=decoder, likelihood=likelihood, posterior=posterior, image_shape=image_shape)


def _part(kind: str, name: str, options: dict, make):
    try:
        return make()
    except OptionError as e:
        raise ConfigError(f"model.{kind} {name!r}: model.{kind}_options.{e}") from None
    except (ValueError, TypeError) as e:
        given = f" with model.{kind}_options {options}" if options else ""
        raise ConfigError(f"model.{kind} {name!r}{given} cannot be built: {e}") from None
