"""Is our VampPrior -log p(x) the one stock Pyro distributions give? An oracle for the estimator.

The IWAE-K estimate of a trained VampPrior run by ``pyrovae.evaluate.importance_log_likelihood``
(our fused mixture density and likelihood fast paths) against the same estimate written with stock
Pyro distributions (a ``MixtureSameFamily`` prior over the pseudo-inputs' posteriors, a
``Bernoulli`` likelihood), on the same draws of z: the two must agree to float rounding. Prints both
and their difference; exits 1 when they differ by more than ``--tolerance`` nats.

    PYROVAE_DATA=../shared/data python experiments/studies/crosscheck_vamp.py --run runs/reproduce/tomczak_vamp
    python experiments/studies/crosscheck_vamp.py --smoke     # an untrained 5-component VampPrior, 8 images
"""

from __future__ import annotations

import argparse
import math
import sys

import pyro.distributions as dist
import torch

from pyrovae import Config, build_vae
from pyrovae.checkpoint import load_vae
from pyrovae.data import prepare_test
from pyrovae.evaluate import importance_log_likelihood, seeded_noise


def stock_estimate(vae, x: torch.Tensor, k: int, seed: int = 0) -> float:
    """-log p(x) per image by IWAE-k, from stock Pyro distributions, drawing z as our estimator does."""
    with torch.no_grad(), seeded_noise(seed, x.device):
        components = vae.posterior(vae.prior.pseudo_inputs)
        prior = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(components.batch_shape[0])), components)
        q = vae.posterior(x)
        z = q.sample((k,))  # (k, images, D)
        logits = vae.decoder(z)
        log_px_z = dist.Bernoulli(logits=logits).log_prob(x.expand_as(logits)).flatten(2).sum(-1)
        log_pz = torch.cat([prior.log_prob(z[i:i + 50]) for i in range(0, k, 50)])
        log_w = log_px_z + log_pz - q.log_prob(z)
        return -(torch.logsumexp(log_w.double(), 0) - math.log(k)).mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/reproduce/tomczak_vamp", help="a trained VampPrior run (Bernoulli)")
    p.add_argument("--particles", type=int, default=1000, help="K, importance samples per image")
    p.add_argument("--images", type=int, default=100, help="the first N test images")
    p.add_argument("--tolerance", type=float, default=1e-3, help="nats per image the two may differ by")
    p.add_argument("--smoke", action="store_true", help="an untrained 5-component VampPrior on 8 random images")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        torch.manual_seed(0)
        config = Config().replace(model={"prior": "vamp", "prior_options": {"components": 5}, "hidden": (32,)})
        vae, x, k = build_vae(config.model), torch.rand(8, 1, 28, 28).bernoulli(), 20
    else:
        vae, config, _ = load_vae(f"{args.run}/checkpoint.pt")
        x, k = prepare_test(config, torch.device("cpu"))[0][:args.images], args.particles
    vae.eval()
    ours = importance_log_likelihood(vae, x, k=k, batch_size=100, max_rows=100_000)["neg_log_likelihood"]
    stock = stock_estimate(vae, x, k)
    print(f"ours {ours:.5f}  stock {stock:.5f}  difference {ours - stock:+.2e} nats per image "
          f"(IWAE-{k}, first {x.shape[0]} test images)")
    return 0 if abs(ours - stock) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
