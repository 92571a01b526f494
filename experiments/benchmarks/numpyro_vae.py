"""The default model in NumPyro, one jitted epoch at a time: the row ``benchmark_speed.py`` compares
our epoch with. Run by it in a process of its own when ``jax`` and ``numpyro`` are importable
(``pip install jax numpyro``; never needed by the tests).

The model is ours (784-400-50 MLPs with softplus, a standard Normal prior, Bernoulli logits, the
encoder's scale a softplus), trained as NumPyro's own VAE example trains its model (pyro-ppl/numpyro,
``examples/vae.py``): ``TraceMeanField_ELBO``, Adam 1e-3, batch 256, and the whole epoch compiled
by XLA as one loop (``jit`` of a ``lax.fori_loop`` over ``svi.update``), the permutation and the
dynamic binarization drawn inside it, one host read per epoch.

    python experiments/benchmarks/numpyro_vae.py IMAGES.npy --epochs 4

``IMAGES.npy``: uint8 training images, (N, 784). Prints one JSON line: the seconds of each epoch
(the first includes XLA's compilation), the mean -ELBO per image of each, and the versions.

With ``--serve`` it compiles (one epoch), prints that line, then runs one more epoch for each line it
reads on its standard input and answers each with a JSON line of that epoch, until the input ends.
``benchmark_speed.py`` interleaves these epochs with its own rounds, so both libraries are timed
on the machine as it is at that moment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.example_libraries import stax
from numpyro.infer import SVI, TraceMeanField_ELBO


def networks(hidden: int, z_dim: int, pixels: int):
    encoder = stax.serial(stax.Dense(hidden), stax.Softplus, stax.FanOut(2),
                          stax.parallel(stax.Dense(z_dim), stax.serial(stax.Dense(z_dim), stax.Softplus)))
    decoder = stax.serial(stax.Dense(hidden), stax.Softplus, stax.Dense(pixels))
    return encoder, decoder


def build(hidden: int, z_dim: int, pixels: int, batch: int):
    encoder, decoder = networks(hidden, z_dim, pixels)

    def model(x):
        decode = numpyro.module("decoder", decoder, (batch, z_dim))
        with numpyro.plate("images", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(z_dim), 1.0).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=decode(z)).to_event(1), obs=x)

    def guide(x):
        encode = numpyro.module("encoder", encoder, (batch, pixels))
        loc, scale = encode(x)
        with numpyro.plate("images", x.shape[0]):
            numpyro.sample("z", dist.Normal(loc, scale + 1e-4).to_event(1))
    return SVI(model, guide, numpyro.optim.Adam(1e-3), TraceMeanField_ELBO())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", help="uint8 training images, (N, 784), as .npy")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--serve", action="store_true", help="after the first epoch, one epoch per line read on stdin")
    args = p.parse_args(argv)
    images = jnp.asarray(np.load(args.images).reshape(-1, 784))
    n, batch = images.shape[0], args.batch_size
    steps = n // batch  # as NumPyro's example: full batches only
    svi = build(400, 50, 784, batch)
    state = svi.init(jax.random.PRNGKey(0), jnp.zeros((batch, 784)))

    @jax.jit
    def epoch(state, key):
        order = jax.random.permutation(key, n)

        def body(i, carry):
            state, total = carry
            chosen = jax.lax.dynamic_slice(order, (i * batch,), (batch,))
            x = jax.random.bernoulli(jax.random.fold_in(key, i), images[chosen] / 255.0).astype(jnp.float32)
            state, loss = svi.update(state, x)
            return state, total + loss
        return jax.lax.fori_loop(0, steps, body, (state, 0.0))

    seconds, losses = [], []

    def timed(e):
        nonlocal state
        began = time.perf_counter()
        state, total = epoch(state, jax.random.PRNGKey(e + 1))
        total = float(total)  # the one host read: waits for the epoch
        seconds.append(time.perf_counter() - began)
        losses.append(total / (steps * batch))
        return {"seconds": seconds[-1], "neg_elbo": losses[-1]}

    for e in range(1 if args.serve else args.epochs):
        timed(e)
    print(json.dumps({"seconds": seconds, "neg_elbo": losses, "steps": steps, "batch_size": batch,
                      "versions": {"jax": jax.__version__, "numpyro": numpyro.__version__}}), flush=True)
    if args.serve:
        for e, _ in enumerate(sys.stdin, start=1):
            print(json.dumps(timed(e)), flush=True)


if __name__ == "__main__":
    main()
