"""Cross-check of the VampPrior -log p(x): our estimator against one written with stock Pyro distributions
(MixtureSameFamily prior, Bernoulli likelihood) on the same draws, IWAE-1000 on the first 100 test images.

    PYROVAE_DATA=../shared/data python results/reproduce/crosscheck_vamp.py
"""
import math

import pyro.distributions as dist
import torch

from pyrovae.checkpoint import load_vae
from pyrovae.evaluate import importance_log_likelihood, seeded_noise
from pyrovae.data import prepare_data
torch.set_num_threads(1)
vae, config, state = load_vae("runs/reproduce/tomczak_vamp/checkpoint.pt"); vae.eval()
x = prepare_data(config, torch.device("cpu")).test[:100]
k = 1000
ours = importance_log_likelihood(vae, x, k=k, batch_size=100, max_rows=100_000)
with torch.no_grad(), seeded_noise(0, x.device):
    posteriors = vae.posterior(vae.prior.pseudo_inputs)
    prior = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(posteriors.batch_shape[0])), posteriors)
    q = vae.posterior(x)
    z = q.sample((k,))  # (k, 100, D)
    logits = vae.decoder(z)  # (k, 100, 1, 28, 28)
    log_px_z = dist.Bernoulli(logits=logits).log_prob(x.expand_as(logits)).flatten(2).sum(-1)
    log_pz = torch.cat([prior.log_prob(z[i:i + 50]) for i in range(0, k, 50)])
    log_w = log_px_z + log_pz - q.log_prob(z)
    stock = -(torch.logsumexp(log_w.double(), 0) - math.log(k)).mean().item()
print(f"ours {ours['neg_log_likelihood']:.5f}  stock {stock:.5f}  (IWAE-{k}, first 100 test images)")
