"""A stack of stochastic layers as a pair of Pyro programs: the hierarchical VAE.

Generative story, top-down, for each image n in the data plate (L layers, ``model.latents``)::

    z_L ~ p(z_L)                                the prior: any registered one
    z_l ~ N(mu_l(z_{l+1}), diag(sigma_l(z_{l+1})^2)),   l = L-1, ..., 1
    x   ~ p(x | decoder(z_1))                   the likelihood: any registered one

With ``model.decoder_skip`` the decoder also reads the top-down path: the hidden features h(z_2)
that p(z_1 | z_2) is computed from enter the decoder's first layer beside z_1, so
x ~ p(x | decoder(z_1, h(z_2))). The upper layer then reaches the data without passing through
z_1's noise, as in NVAE's and VDVAE's decoders, whose top-down state feeds the output, and in
Tomczak and Welling's (2018) two-level HVAE, p(x | z_1, z_2). The code the decoder reads
(:meth:`HierarchicalVAE.encode`, ``decode``) is then z_1 and z_2 joined. Measured, it did not help:
on MNIST's bottom-up DReG stack z_2 fell out of use (``results/two_layer/dreg_skip``), and on the
CIFAR-10 residual stack z_1 did (``results/cifar10``): the guide put its information in one layer.

Each layer is one sample site, ``z1`` (next to the data) to ``zL`` (the top). The guide q(z|x) is
one of two factorizations, ``model.inference``:

``bottom_up`` (Burda et al. 2015)::

    q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1})

each a diagonal Gaussian from its own network.

``top_down`` (the Ladder VAE, Sonderby et al. 2016)::

    q(z_L | x) q(z_{L-1} | z_L, x) ... q(z_1 | z_2, x)

A deterministic bottom-up pass d_1 = f_1(x), d_l = f_l(d_{l-1}) gives each layer a Gaussian
estimate N(m_l, s_l^2) from the data. The top layer is that estimate; every lower one combines it
with the generative conditional p(z_l | z_{l+1}) = N(mu_l, sigma_l^2), precision-weighted:

    q(z_l | z_{l+1}, x) = N((m_l / s_l^2 + mu_l / sigma_l^2) / (1 / s_l^2 + 1 / sigma_l^2),
                           1 / (1 / s_l^2 + 1 / sigma_l^2))

so inference shares the generative path: where the data say little (large s_l) the guide follows
the model's conditional and the layer's KL term vanishes, which keeps the upper layers in use
(the Ladder VAE's argument for it).

``top_down_residual`` (NVAE, Vahdat and Kautz 2020) takes the same estimates as a shift and a
scaling of the model's conditional instead:

    q(z_l | z_{l+1}, x) = N(mu_l + m_l, (sigma_l s_l)^2)

so each layer's KL, 0.5 * sum(s_l^2 + m_l^2 / sigma_l^2 - 1 - log s_l^2), depends on the
estimates only through how far they move q from p: the guide cannot make a layer cheap by
following a conditional that has itself moved to the data, the collapse measured below. It is the
default. Both merges keep q and p(z_l | z_{l+1}) in one family, so the mean-field objectives take
each layer's KL in closed form. Under either top-down guide q(z_L | x) is a single Gaussian, the
VampPrior's component at a pseudo-input u; under the bottom-up guide the component is
q(z_L | z_{L-1}) with the lower layers at their means given u (:meth:`StackEncoder.forward`), a
Gaussian mixture prior tied to the guide all the same.

Measured on MNIST (``results/two_layer``), the precision-weighted top-down guide trained far worse
than the bottom-up one at an equal budget: most of z_2 and much of z_1 fell inactive, with p(z_1 | z_2)
closing in on q. The Ladder VAE needed batch normalization and a long KL warm-up (200 epochs)
to train; neither is here. The residual form, with the same networks, did not collapse: at the same
20 minutes it reached 86.91 nats against the bottom-up guide's 87.24 and the precision-weighted
guide's 106.62.

The networks are MLPs: ``model.hidden`` between the image and z_1 (the decoder mirrors it), and
``model.latent_hidden`` between two latent layers (default: two layers as wide as the lower one,
Burda et al.'s 100-100 between latents of 100 and 50).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import pyro_method
from torch import nn
from torch.nn import functional as F

from pyrovae.config import INFERENCES  # noqa: F401  (the guides by config name)
from pyrovae.model import VAE, _kl_scale
from pyrovae.networks import ACTIVATIONS, MLPDecoder

__all__ = ["INFERENCES", "GaussianNet", "HierarchicalVAE", "StackEncoder", "precision_weighted", "residual"]


class GaussianNet(nn.Module):
    """h -> (loc, scale, features): an MLP whose last hidden layer also feeds the next layer up.

    The scale is ``softplus(raw) + min_scale``, as in :class:`pyrovae.networks.MLPEncoder`.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: str, min_scale: float):
        super().__init__()
        layers: list[nn.Module] = []
        for n_in, n_out in zip((in_dim, *hidden[:-1]), hidden):
            layers += [nn.Linear(n_in, n_out), ACTIVATIONS[activation]()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden[-1] if hidden else in_dim, 2 * out_dim)
        self.min_scale = min_scale

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.body(h)  # (..., hidden[-1])
        loc, raw_scale = self.head(features).chunk(2, dim=-1)  # (..., out_dim) each
        return loc, F.softplus(raw_scale) + self.min_scale, features


def precision_weighted(loc_q, scale_q, loc_p, scale_p) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized product of N(loc_q, scale_q^2) and N(loc_p, scale_p^2): (loc, scale)."""
    precision_q, precision_p = scale_q.pow(-2), scale_p.pow(-2)
    variance = 1 / (precision_q + precision_p)
    return (loc_q * precision_q + loc_p * precision_p) * variance, variance.sqrt()


def residual(loc_q, scale_q, loc_p, scale_p) -> tuple[torch.Tensor, torch.Tensor]:
    """N(loc_p + loc_q, (scale_p * scale_q)^2): the data's estimate as a shift and scaling of p (NVAE)."""
    return loc_p + loc_q, scale_p * scale_q


#: How a top-down guide merges the data's estimate of a layer with the model's conditional of it.
MERGES = {"top_down": precision_weighted, "top_down_residual": residual}


def _normal(loc, scale) -> dist.Distribution:
    return dist.Normal(loc, scale, validate_args=False).to_event(1)


class StackEncoder(nn.Module):
    """The guide's networks: one per layer, bottom (x -> z_1) to top, each giving (loc, scale, features).

    Calling it on images gives a Gaussian over the top layer per image (:meth:`forward`): what a
    VampPrior on the top layer mixes at its pseudo-inputs.
    """

    def __init__(self, nets: list[nn.Module], inference: str, image_dims: int = 3, flatten: bool = True):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.inference = inference
        self.image_dims, self.flatten = image_dims, flatten  # flatten: the first network takes flat images

    def estimates(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The top-down guide's data estimates (m_l, s_l), l = 1..L, from one deterministic pass."""
        h, out = (x.flatten(-self.image_dims) if self.flatten else x), []
        for net in self.nets:
            loc, scale, h = net(h)
            out.append((loc, scale))
        return out

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        """A Gaussian over the top layer for each image: q(z_L | x) under the top-down guide; under the
        bottom-up one, whose q(z_L | x) mixes over the lower layers' draws, q(z_L | z_{L-1}) with every
        lower layer at its mean given the one below (the path of the guide's means)."""
        if self.inference != "bottom_up":  # the top layer has no parent to merge with
            return _normal(*self.estimates(x)[-1])
        h = x.flatten(-self.image_dims)
        for net in self.nets[:-1]:
            h = net(h)[0]  # the mean of this layer given the one below
        return _normal(*self.nets[-1](h)[:2])


class HierarchicalVAE(VAE):
    """A VAE with L >= 2 stochastic layers; see the module docstring for the story and the guides.

    Args:
        prior: p(z_L), a prior module over the top layer.
        conditionals: L - 1 networks, ``conditionals[l - 1]``: z_{l+1} -> p(z_l | z_{l+1}).
        decoder: z_1 -> raw outputs of shape (batch, *image_shape).
        likelihood: decoder outputs -> p(x | z_1).
        posterior: the guide's networks (:class:`StackEncoder`).
        image_shape: (C, H, W) of one image.
        latents: the layer sizes, bottom first.
        skip: the top-down path's features h(z_2) (the third output of ``conditionals[0]``) -> the
            decoder's ``context``; None: the decoder reads z_1 alone.
    """

    def __init__(self, prior: nn.Module, conditionals: list[GaussianNet], decoder: nn.Module, likelihood: nn.Module,
                 posterior: StackEncoder, image_shape: tuple[int, ...], latents: tuple[int, ...],
                 skip: nn.Module | None = None):
        super().__init__(prior=prior, decoder=decoder, likelihood=likelihood, posterior=posterior,
                         image_shape=image_shape)
        self.conditionals = nn.ModuleList(conditionals)
        self.latents = tuple(latents)
        self.skip = skip

    def _outputs(self, z1: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """The decoder's raw outputs given z_1 and the features p(z_1 | z_2) was computed from."""
        return self.decoder(z1) if self.skip is None else self.decoder(z1, self.skip(features))

    def _code(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """The code the decoder reads: z_1, or z_1 and z_2 joined under the skip."""
        return z1 if self.skip is None else torch.cat([z1, z2], dim=-1)

    def outputs(self, code: torch.Tensor) -> torch.Tensor:
        """The decoder's raw outputs for a code of :meth:`encode`'s form."""
        if self.skip is None:
            return self.decoder(code)
        z1, z2 = code.split(list(self.latents[:2]), dim=-1)
        return self._outputs(z1, self.conditionals[0](z2)[2])

    @property
    def inference(self) -> str:
        return self.posterior.inference

    def site(self, layer: int) -> str:
        """The sample site of layer ``layer`` (1 is next to the data)."""
        return f"z{layer}"

    @pyro_method
    def model(self, x: torch.Tensor | None = None, kl_weight: float = 1.0, batch_size: int | None = None
              ) -> torch.Tensor:
        """p(x, z_1..z_L), top-down; without ``x`` it runs generatively for ``batch_size`` images."""
        with pyro.plate("data", self._batch(x, batch_size)):
            with _kl_scale(kl_weight):
                z = pyro.sample(self.site(len(self.latents)), self.prior())  # (batch, latents[-1])
                for layer in range(len(self.latents) - 1, 0, -1):
                    loc, scale, features = self.conditionals[layer - 1](z)
                    z = pyro.sample(self.site(layer), _normal(loc, scale))  # (batch, latents[layer - 1])
            pyro.sample("x", self.likelihood(self._outputs(z, features)), obs=x)  # (batch, C, H, W)
        return z

    @pyro_method
    def guide(self, x: torch.Tensor, kl_weight: float = 1.0, batch_size: int | None = None) -> torch.Tensor:
        """q(z_1..z_L | x), bottom-up or top-down (``model.inference``); returns z_1."""
        self._check_guide_input(x)
        with pyro.plate("data", x.shape[0]), _kl_scale(kl_weight):
            layers = self.walk_guide(x, pyro.sample)
        return layers[self.site(1)][0]

    def walk_guide(self, x: torch.Tensor, draw) -> dict[str, tuple[torch.Tensor, dist.Distribution]]:
        """The guide's factorization, each layer drawn by ``draw(site, q) -> z``: {site: (z, q)} in
        the guide's order. ``pyro.sample`` makes it the guide; ``lambda _, q: q.rsample(shape)`` makes
        it the plain-torch mirror that the hand-coded objectives and the evaluation use."""
        layers = {}
        if self.inference == "bottom_up":
            h = x.flatten(-len(self.image_shape))
            for layer, net in enumerate(self.posterior.nets, start=1):
                q = _normal(*net(h)[:2])
                h = draw(self.site(layer), q)  # (..., batch, latents[layer - 1])
                layers[self.site(layer)] = (h, q)
            return layers
        estimates = self.posterior.estimates(x)  # (m_l, s_l), l = 1..L
        q = _normal(*estimates[-1])
        z = draw(self.site(len(self.latents)), q)
        layers[self.site(len(self.latents))] = (z, q)
        for layer in range(len(self.latents) - 1, 0, -1):
            loc_p, scale_p, _ = self.conditionals[layer - 1](z)
            q = _normal(*MERGES[self.inference](*estimates[layer - 1], loc_p, scale_p))
            z = draw(self.site(layer), q)
            layers[self.site(layer)] = (z, q)
        return layers

    def conditional(self, layer: int, parent: torch.Tensor) -> dist.Distribution:
        """p(z_layer | z_{layer+1} = parent), or the prior p(z_L) for the top layer (``parent`` None)."""
        if layer == len(self.latents):
            return self.prior()
        return _normal(*self.conditionals[layer - 1](parent)[:2])

    def stack_terms(self, x: torch.Tensor, sample_shape: torch.Size = torch.Size()) -> dict:
        """The plain-torch ELBO terms of reparameterized draws z ~ q(z|x) of shape ``sample_shape``:

        ``{"reconstruction": log p(x | z_1), "layers": {site: (z, q, p)}}``, where q and p are the guide's
        and the model's distribution of that layer given the same draws of the layers it depends on
        (p is the prior for the top layer); the log densities have shape (*sample_shape, batch).
        """
        first = [True]

        def draw(_, q):
            z = q.rsample(sample_shape if first[0] else ())
            first[0] = False
            return z

        layers = self.walk_guide(x, draw)
        top = len(self.latents)
        out = {self.site(top): (*layers[self.site(top)], self.prior())}
        for layer in range(top - 1, 0, -1):  # the model's order, from the top down
            z, q = layers[self.site(layer)]
            loc, scale, features = self.conditionals[layer - 1](layers[self.site(layer + 1)][0])
            out[self.site(layer)] = (z, q, _normal(loc, scale))
        log_px_z = self.likelihood(self._outputs(layers[self.site(1)][0], features)).log_prob(x)
        return {"reconstruction": log_px_z, "layers": out}

    def log_weights(self, x: torch.Tensor, particles: int, kl_weight: float = 1.0) -> torch.Tensor:
        """log p(x, z) - log q(z|x) for ``particles`` draws per image: (particles, batch); ``kl_weight``
        scales each layer's log p(z_l | .) - log q(z_l | .), as the KL weight scales the latent sites."""
        terms = self.stack_terms(x, torch.Size([particles]))
        log_w = terms["reconstruction"]
        for z, q, p in terms["layers"].values():
            log_w = log_w + kl_weight * (p.log_prob(z) - q.log_prob(z))
        return log_w

    # --- conveniences for pictures and evaluation (no Pyro machinery) ---------------------------
    @torch.no_grad()
    def encode_layers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The guide's means, each layer given the means of those it depends on: {site: (batch, size)}."""
        return {name: z for name, (z, _) in self.walk_guide(x, lambda _, q: q.mean).items()}

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code the decoder reads by the guide's means: z_1, (batch, latents[0]), or under the skip
        z_1 and z_2 joined, (batch, latents[0] + latents[1])."""
        layers = self.encode_layers(x)
        return self._code(layers[self.site(1)], layers[self.site(2)])

    @torch.no_grad()
    def sample_layers(self, n: int, top: torch.Tensor | None = None) -> torch.Tensor:
        """The code (as :meth:`encode`'s) of n draws from the model, top-down; ``top`` (n, latents[-1])
        fixes the top layer."""
        z = self.prior().sample((n,)) if top is None else top
        for layer in range(len(self.latents) - 1, 0, -1):
            parent, z = z, self.conditional(layer, z).sample()
        return self._code(z, parent)

    @torch.no_grad()
    def sample(self, n: int, top: torch.Tensor | None = None) -> torch.Tensor:
        """E[x | code] for n draws of the stack from the model (the top layer fixed if given): (n, C, H, W)."""
        return self.decode(self.sample_layers(n, top))


def build_hierarchical(c, image_shape: tuple[int, ...], likelihood: nn.Module, make_prior) -> HierarchicalVAE:
    """The hierarchical VAE a model config with ``latents`` describes (MLP networks).

    ``make_prior(z_dim, posterior)`` builds the top layer's prior (it may need the guide: VampPrior).
    """
    latents, act, floor = tuple(c.latents), c.activation, c.min_scale
    # hidden widths between latent layers l and l + 1, l = 1..L-1
    between = [(lower, lower) if c.latent_hidden is None else tuple(c.latent_hidden) for lower in latents[:-1]]
    ins = [math.prod(image_shape), *latents[:-1]]  # each inference network's input: the layer below...
    if c.inference != "bottom_up":  # ...or the features of the network below
        width = ins[0]
        for layer, widths in enumerate([c.hidden, *between[:-1]], start=1):
            width = widths[-1] if widths else width
            ins[layer] = width
    nets = [GaussianNet(ins[0], tuple(c.hidden), latents[0], act, floor)]
    nets += [GaussianNet(ins[layer], between[layer - 1], latents[layer], act, floor) for layer in range(1, len(latents))]
    posterior = StackEncoder(nets, c.inference, len(image_shape))
    conditionals = [GaussianNet(latents[layer], tuple(reversed(between[layer - 1])), latents[layer - 1], act, floor)
                    for layer in range(1, len(latents))]
    decoder = MLPDecoder(latents[0], (image_shape[0] * likelihood.outputs_per_pixel, *image_shape[1:]),
                         tuple(reversed(c.hidden)), act)
    skip = None
    if c.decoder_skip:  # h(z_2), the last hidden layer of p(z_1 | z_2), into the decoder's first layer
        features = between[0][0] if between[0] else latents[1]
        skip = nn.Linear(features, decoder.net[0].out_features)
    prior = make_prior(latents[-1], posterior)
    return HierarchicalVAE(prior, conditionals, decoder, likelihood, posterior, image_shape, latents, skip)
