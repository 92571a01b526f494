"""Four estimators of the same ELBO, trained from the same start: do they agree, and what do they cost?

1. ``trace_elbo``: Pyro's ``Trace_ELBO`` (KL by one Monte Carlo sample) around ``vae.model``/``vae.guide``.
2. ``meanfield_elbo``: Pyro's ``TraceMeanField_ELBO`` (KL in closed form where torch knows it).
3. ``manual_analytic``: the hand-coded ELBO of ``pyrovae.elbo_manual``, closed-form KL (the twin of 2).
4. ``manual_mc``: the hand-coded ELBO with the one-sample KL (the twin of 1).

Every method trains its own copy of one initialized VAE, sees the same batches in the same order
(its own generator, seeded alike) and draws its reparameterization noise from the same seed, so twins
(1, 4) and (2, 3) should follow the same trajectory up to float rounding. Epochs are interleaved
(epoch 1 of each method, then epoch 2 of each, ...) so a noisy machine slows all methods alike: each
method keeps its own ``TrainState``, and ``fit`` takes it one epoch further at a time.

Also measured: the variance of the encoder's gradient under the one-sample and the closed-form KL,
from many draws of the noise on one fixed batch, at the initial parameters and after training.

    python experiments/studies/compare_elbo.py --epochs 3
    python experiments/studies/compare_elbo.py --smoke --out /tmp/compare_elbo
"""

from __future__ import annotations

import argparse
import sys

import pyro
import torch

from pyrovae import plots
from pyrovae.config import Config
from pyrovae.data import prepare_data
from pyrovae.engine import fit, make_optimizer
from pyrovae.state import TrainState
from pyrovae.experiment import add_output_flags, output_folders
from pyrovae.build import build_vae
from pyrovae.objectives import build_objective
from pyrovae.atomic import write_json
from pyrovae.provenance import provenance

#: The objectives compared, by their names in ``pyrovae.objectives.OBJECTIVES``.
METHODS = ("trace_elbo", "meanfield_elbo", "manual_analytic", "manual_mc")
#: Pairs that compute the same estimator and should therefore train alike.
TWINS = [("trace_elbo", "manual_mc"), ("meanfield_elbo", "manual_analytic")]
#: The one-sample and the closed-form KL of the hand-coded ELBO, for the gradient variance.
KL_ESTIMATORS = {"mc": "manual_mc", "analytic": "manual_analytic"}
OUT = "results/compare_elbo"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="epochs of each method")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="initialization, data order and noise")
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N images; default all")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images; default all")
    p.add_argument("--z-dim", type=int, default=None, help="latent size; default the config's (50)")
    p.add_argument("--hidden", type=int, default=None, help="hidden width; default the config's (400)")
    p.add_argument("--grad-samples", type=int, default=200, help="gradient draws per estimator for the variance")
    p.add_argument("--data-dir", default=None)
    add_output_flags(p, out=OUT, smoke="a tiny model on 512 images for 2 epochs, in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.train_subset, args.test_subset = 2, 512, 256
        args.z_dim, args.hidden, args.grad_samples = args.z_dim or 8, args.hidden or 64, 20
    return args


def make_config(args) -> Config:
    model = {k: v for k, v in [("z_dim", args.z_dim), ("hidden", (args.hidden,) if args.hidden else None)] if v}
    return Config().replace(
        model=model, data={"data_dir": args.data_dir},
        train={"batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "device": "cpu",
               "train_subset": args.train_subset, "test_subset": args.test_subset})


def twin_vaes(config: Config, names, image_shape):
    """One VAE per name, all with the parameters of one initialization (each its own Pyro name)."""
    pyro.set_rng_seed(config.train.seed)
    first = build_vae(config.model, image_shape)
    vaes = {}
    for name in names:
        vae = build_vae(config.model, image_shape)
        vae.load_state_dict(first.state_dict())
        vaes[name] = vae
    return vaes


def gradient_variance(vae, x: torch.Tensor, draws: int, seed: int) -> dict:
    """Total variance (summed over elements) of d(-ELBO)/d(encoder parameters) over noise draws.

    ``x`` is one fixed batch; the loss is the batch-summed -ELBO that training differentiates.
    """
    params = list(vae.posterior.parameters())
    result = {}
    for kl, objective in KL_ESTIMATORS.items():
        loss_fn = build_objective(objective, vae)
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        square = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        torch.manual_seed(seed)
        for _ in range(draws):
            grads = torch.autograd.grad(loss_fn(x), params)
            for t, s, g in zip(total, square, grads):
                t += g.double()
                s += g.double() ** 2
        variance = sum(((s - t**2 / draws) / (draws - 1)).clamp_min(0).sum().item() for t, s in zip(total, square))
        mean_norm2 = sum(((t / draws) ** 2).sum().item() for t in total)
        result[kl] = {"total_variance": variance, "mean_gradient_norm_squared": mean_norm2}
    result["ratio_mc_to_analytic"] = result["mc"]["total_variance"] / result["analytic"]["total_variance"]
    return result


def train_interleaved(vaes, config, data, epochs, log=print) -> list[dict]:
    """Epoch e of every method, then epoch e + 1 of every method; returns one row per epoch."""
    t = config.train
    device = data.train.device
    losses = {name: build_objective(name, vae) for name, vae in vaes.items()}
    optimizers = {name: make_optimizer(vae.parameters(), t.lr, device) for name, vae in vaes.items()}
    states = {name: TrainState.start(t.seed, device) for name in vaes}  # the same data order and binarization
    history = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch}
        budget = config.replace(train={"epochs": epoch})  # fit stops after this one epoch
        for name, vae in vaes.items():
            pyro.set_rng_seed(t.seed + 1000 * epoch)  # the same reparameterization noise for every method
            states[name] = fit(budget, vae, losses[name], optimizers[name], data, states[name], quiet=True)
            done = states[name].history[-1]
            row[name] = {key: done[key] for key in ("train_neg_elbo", "test_neg_elbo", "test_kl", "seconds")}
        history.append(row)
        log(f"epoch {epoch}: " + "  ".join(
            f"{n} test {row[n]['test_neg_elbo']:.2f} ({row[n]['seconds']:.1f} s)" for n in vaes), flush=True)
    return history


def summarize(history, variance) -> dict:
    last = history[-1]
    seconds = {n: sum(r[n]["seconds"] for r in history) / len(history) for n in METHODS}
    return {
        "final_test_neg_elbo": {n: last[n]["test_neg_elbo"] for n in METHODS},
        "mean_seconds_per_epoch": seconds,
        "seconds_ratio_to_manual_mc": {n: s / seconds["manual_mc"] for n, s in seconds.items()},
        "twin_max_abs_test_gap": {f"{a}-{b}": max(abs(r[a]["test_neg_elbo"] - r[b]["test_neg_elbo"]) for r in history)
                                  for a, b in TWINS},
        "gradient_variance_ratio_mc_to_analytic": {k: v["ratio_mc_to_analytic"] for k, v in variance.items()},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    config = make_config(args)
    data = prepare_data(config, torch.device("cpu"), download=False)
    # module-local parameters: the VAEs keep theirs out of Pyro's global store (set before building them)
    with pyro.settings.context(module_local_params=True):
        return run(args, config, data)


def run(args, config, data) -> int:
    vaes = twin_vaes(config, METHODS, tuple(data.train.shape[1:]))
    probe = data.train[: args.batch_size]
    fixed_batch = data.per_batch(probe, torch.Generator().manual_seed(args.seed)) if data.per_batch else probe

    variance = {"initial": gradient_variance(vaes["manual_mc"], fixed_batch, args.grad_samples, args.seed)}
    history = train_interleaved(vaes, config, data, args.epochs)
    variance.update({f"trained_{n}": gradient_variance(vaes[n], fixed_batch, args.grad_samples, args.seed)
                     for n in ("trace_elbo", "meanfield_elbo")})
    summary = summarize(history, variance)

    for n, v in summary["final_test_neg_elbo"].items():
        print(f"{n:16s} test -ELBO {v:8.3f} nats  {summary['mean_seconds_per_epoch'][n]:6.2f} s/epoch  "
              f"time ratio to manual_mc {summary['seconds_ratio_to_manual_mc'][n]:.2f}")
    for pair, gap in summary["twin_max_abs_test_gap"].items():
        print(f"twins {pair}: largest test -ELBO gap {gap:.2e} nats")
    for k, v in variance.items():
        print(f"encoder gradient variance ({k}): mc {v['mc']['total_variance']:.4g}  analytic "
              f"{v['analytic']['total_variance']:.4g}  ratio {v['ratio_mc_to_analytic']:.3f}")

    with output_folders(args.smoke, args.out, default_out=OUT) as folders:
        out = folders.out
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", {
            "config": config.to_dict(), "seed": args.seed, "epochs": args.epochs, "smoke": args.smoke,
            "grad_samples": args.grad_samples, "units": "nats per image; seconds of training per epoch",
            "gradient_variance_batch": {"images": int(fixed_batch.shape[0]), "loss": "batch-summed -ELBO",
                                        "parameters": "encoder (posterior)"},
            "history": history, "gradient_variance": variance, "summary": summary, **provenance("cpu")})
        plots.curves({n: [r[n]["test_neg_elbo"] for r in history] for n in METHODS}, out / "test_neg_elbo.png",
                     "test -ELBO per image (nats)", "Same start, same data, same noise")
        plots.curves({n: [r[n]["seconds"] for r in history] for n in METHODS}, out / "seconds_per_epoch.png",
                     "seconds per training epoch", "Interleaved epochs")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
