"""Looking back at log p(x): estimated by sampling the prior, and by importance sampling with the encoder.

For each test image x and sample counts S = 1, 10, 100, ..., two unbiased estimates of p(x), on a
log scale (so each is biased low, by less as S grows)::

    naive    log (1/S) sum_s p(x|z_s),                        z_s ~ p(z)
    IS       log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x),      z_s ~ q(z|x)

Each is repeated with fresh samples to show its spread. The samples of one repeat are drawn in
chunks and the estimate for every S is read off the same running log-sum-exp, so memory is bounded
by the chunk size and the S-sample estimate uses the first S samples of the repeat. The naive
estimator's z do not depend on x, so one chunk of decoded z serves every image at once; the IS
estimator decodes S codes per image, which is why its budget is set separately.

Writes ``looking_back.png``, ``looking_back.json`` (estimates, settings, provenance) and
``looking_back.md`` (the table and the command) to ``--out``.

    python experiments/studies/looking_back.py --checkpoint runs/mnist    # results/theory/
    python experiments/studies/looking_back.py --smoke --out /tmp/x       # seconds, for the tests
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from pyrovae.checkpoint import load_vae
from pyrovae.config import Config
from pyrovae.data import DatasetNotFoundError, Prepared, prepare_data, prepare_test
from pyrovae.engine import fit, make_optimizer
from pyrovae.experiment import add_output_flags, command, output_folders
from pyrovae.lecture import figures
from pyrovae.build import build_vae
from pyrovae.objectives import build_objective
from pyrovae.atomic import write_json
from pyrovae.provenance import provenance

ESTIMATORS = ("naive", "importance")
OUT = "results/theory"
LABELS = {"naive": "naive: z ~ p(z)", "importance": "importance sampling: z ~ q(z|x)"}


# --- log-likelihood terms, vectorized over samples --------------------------------------------------
def pairwise_log_likelihood(vae, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x_b | z_s) for every image b and code s: (B, S), from x (B, C, H, W) and z (S, z_dim)."""
    p_x = vae.likelihood(vae.decoder(z))  # batch shape (S,)
    base = getattr(p_x, "base_dist", p_x)
    if isinstance(base, torch.distributions.Bernoulli):
        # log p(x|z) = x . logits - sum softplus(logits) is linear in x: one matrix product for all pairs
        logits = base.logits.flatten(1)  # (S, D)
        return x.flatten(1) @ logits.T - F.softplus(logits).sum(-1)
    return p_x.log_prob(x.unsqueeze(1))  # (B, 1, C, H, W) against batch (S,) -> (B, S)


def naive_log_weights(vae, x: torch.Tensor, samples: int, chunk: int):
    """log p(x|z_s), z_s ~ p(z), in chunks of shape (B, c) that add up to ``samples`` columns."""
    prior = vae.prior()
    for start in range(0, samples, chunk):
        z = prior.sample((min(chunk, samples - start),))  # (c, z_dim), shared by every image
        yield pairwise_log_likelihood(vae, x, z)


def importance_log_weights(vae, x: torch.Tensor, samples: int, chunk: int):
    """log p(x|z_s) + log p(z_s) - log q(z_s|x), z_s ~ q(z|x), in chunks of shape (B, c)."""
    q = vae.posterior(x)  # batch shape (B,)
    prior = vae.prior()
    per_chunk = max(1, chunk // x.shape[0])
    for start in range(0, samples, per_chunk):
        c = min(per_chunk, samples - start)
        z = q.sample((c,))  # (c, B, z_dim)
        flat = z.reshape(c * x.shape[0], -1)
        repeated = x.expand(c, *x.shape).reshape(c * x.shape[0], *x.shape[1:])
        log_likelihood = vae.likelihood(vae.decoder(flat)).log_prob(repeated).view(c, -1)  # (c, B)
        yield (log_likelihood + prior.log_prob(z) - q.log_prob(z)).T  # (B, c)


def log_mean_exp_prefixes(chunks, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log (1/S) sum_{s <= S} exp(w_s) for each S in ``counts`` (ascending), and the mean of all w.

    ``chunks`` yields (B, c) blocks of log weights, in order; returns (B, len(counts)) and (B,).
    """
    total, seen, sum_w, results = None, 0, 0.0, []
    for w in chunks:
        c = w.shape[1]
        while len(results) < len(counts) and counts[len(results)] <= seen + c:
            s = counts[len(results)]
            head = w[:, : s - seen].logsumexp(1)
            results.append((head if total is None else torch.logaddexp(total, head)) - math.log(s))
        block = w.logsumexp(1)
        total = block if total is None else torch.logaddexp(total, block)
        sum_w = sum_w + w.sum(1)
        seen += c
    return torch.stack(results, 1), sum_w / seen


@torch.no_grad()
def estimate(vae, x: torch.Tensor, estimator: str, counts: list[int], repeats: int, chunk: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimates (repeats, len(counts), B) of log p(x) and mean log weights (repeats, B)."""
    weights = {"naive": naive_log_weights, "importance": importance_log_weights}[estimator]
    runs, means = [], []
    for r in range(repeats):
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1000 * r + ESTIMATORS.index(estimator))
            values, mean_w = log_mean_exp_prefixes(weights(vae, x, counts[-1], chunk), counts)
        runs.append(values.T)
        means.append(mean_w)
    return torch.stack(runs), torch.stack(means)


# --- the model and the data ---------------------------------------------------------------------
def briefly_trained_vae(config: Config, data: Prepared, log=print):
    """A small VAE trained for a few epochs in-process (runs without a checkpoint)."""
    vae = build_vae(config.model, tuple(data.train.shape[1:]))
    loss_fn = build_objective(config.train.objective, vae, implementation=config.train.implementation)
    state = fit(config, vae, loss_fn, make_optimizer(vae.parameters(), config.train.lr, data.train.device), data,
                quiet=True)
    vae.eval()
    log(f"trained a small VAE in-process: {config.train.epochs} epochs on {len(data.train)} images, "
        f"test -ELBO {state.history[-1]['test_neg_elbo']:.1f} nats/image")
    return vae


SMOKE_CONFIG = Config().replace(
    model={"z_dim": 8, "hidden": (64,)},
    train={"epochs": 3, "batch_size": 100, "lr": 3e-3, "train_subset": 300, "device": "cpu"},
)


def load_model_and_images(args, log=print):
    """(vae, config, description, binary test images), or None if the data is missing."""
    if args.checkpoint:
        vae, config, saved = load_vae(args.checkpoint)
        vae.eval()
        described = {"checkpoint": str(args.checkpoint), "epoch": saved["state"]["epoch"]}
    else:
        config, vae, described = SMOKE_CONFIG, None, {"checkpoint": None}
    config = config.replace(train={"test_subset": args.images})
    if args.data_dir:
        config = config.replace(data={"data_dir": args.data_dir})
    try:
        if vae is None:  # the training split too, to train on
            data = prepare_data(config, torch.device("cpu"), download=False)
            test_binary = data.test
        else:
            test_binary, _ = prepare_test(config, torch.device("cpu"), download=False)
    except DatasetNotFoundError as e:
        log(f"skipping: MNIST is not available ({str(e).splitlines()[0]})")
        return None
    if vae is None:
        vae = briefly_trained_vae(config, data, log)
        described["trained_in_process"] = {"epochs": config.train.epochs, "images": len(data.train)}
    return vae, config, described, test_binary


# --- reporting ----------------------------------------------------------------------------------
def summarize(counts: list[int], estimates: dict[str, torch.Tensor]) -> dict:
    """Per estimator and count: the test-set mean for each repeat, and for the first image."""
    summary = {}
    for name, values in estimates.items():  # (repeats, counts, B)
        test_mean = values.mean(-1)  # (repeats, counts)
        spread = values.shape[0] > 1  # a standard deviation needs two repeats
        summary[name] = {
            "counts": counts[: values.shape[1]],
            "test_mean_per_repeat": test_mean.T.tolist(),  # [count][repeat]
            "test_mean": test_mean.mean(0).tolist(),
            "test_mean_sd_over_repeats": (test_mean.std(0) if spread else torch.zeros(values.shape[1])).tolist(),
            "first_image_per_repeat": values[:, :, 0].T.tolist(),
            "per_image_sd_over_repeats": (values.std(0).mean(-1) if spread else torch.zeros(values.shape[1])).tolist(),
        }
    return summary


def table(counts: list[int], summary: dict) -> list[str]:
    head = f"{'S':>8} | " + " | ".join(f"{name + ' mean':>16} {'sd':>6}" for name in summary)
    rows = [head, "-" * len(head)]
    for i, s in enumerate(counts):
        cells = []
        for name, entry in summary.items():
            if i < len(entry["test_mean"]):
                cells.append(f"{entry['test_mean'][i]:16.2f} {entry['test_mean_sd_over_repeats'][i]:6.2f}")
            else:
                cells.append(f"{'-':>16} {'':>6}")
        rows.append(f"{s:>8} | " + " | ".join(cells))
    return rows


def describe(model: dict) -> str:
    if model["checkpoint"]:
        return f"the checkpoint {model['checkpoint']} (epoch {model['epoch']})"
    trained = model["trained_in_process"]
    return f"a small VAE trained in-process for {trained['epochs']} epochs on {trained['images']} images"


def band(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and min-max over repeats (dim 0), in the keys the plot takes."""
    return {"center": values.mean(0), "low": values.min(0).values, "high": values.max(0).values}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a run folder or checkpoint.pt from `pyrovae train`")
    p.add_argument("--data-dir", default=None, help="MNIST root (default: the checkpoint's, else $PYROVAE_DATA)")
    p.add_argument("--images", type=int, default=None, help="test images (default 100; 20 with --smoke)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="largest S for the naive estimator, a power of 10 (default 1e5; 1e3 with --smoke)")
    p.add_argument("--max-is-samples", type=int, default=None,
                   help="largest S for importance sampling, a power of 10 (default 1e4; 1e2 with --smoke)")
    p.add_argument("--repeats", type=int, default=None, help="independent repeats (default 5; 2 with --smoke)")
    p.add_argument("--chunk", type=int, default=8192, help="decoded codes per chunk: bounds memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_output_flags(p, out=OUT, smoke="20 images, S up to 1000, 2 repeats, a small VAE trained in-process")
    args = p.parse_args(argv)
    small = {"images": 20, "max_samples": 1000, "max_is_samples": 100, "repeats": 2}
    large = {"images": 100, "max_samples": 100_000, "max_is_samples": 10_000, "repeats": 5}
    for key, value in (small if args.smoke else large).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    loaded = load_model_and_images(args)
    if loaded is None:
        return 0
    with output_folders(args.smoke, args.out, default_out=OUT) as folders:
        report(args, *loaded, folders.out, command(__file__, argv))
    return 0


def report(args, vae, config, described: dict, x: torch.Tensor, out, made_by: str) -> None:
    """Estimate, print and write the figures, JSON and table into ``out``; ``made_by``: the command."""
    out.mkdir(parents=True, exist_ok=True)

    counts = [10**i for i in range(int(math.log10(args.max_samples)) + 1)]
    budget = {"naive": counts, "importance": [s for s in counts if s <= args.max_is_samples]}
    estimates, mean_log_weights, seconds = {}, {}, {}
    for name in ESTIMATORS:
        start = time.perf_counter()
        estimates[name], mean_log_weights[name] = estimate(vae, x, name, budget[name], args.repeats, args.chunk, args.seed)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {args.repeats} repeats x {budget[name][-1]} samples x {len(x)} images in {seconds[name]:.1f} s")

    summary = summarize(counts, estimates)
    elbo = mean_log_weights["importance"].mean().item()  # E_q[log p(x,z) - log q(z|x)], per image
    lines = table(counts, summary)
    print("\n".join(lines))
    print(f"ELBO (mean log weight under q, {budget['importance'][-1]} samples x {args.repeats} repeats): {elbo:.2f} nats/image")

    write_json(out / "looking_back.json", {
        "units": "nats per image; test images binarized once with seed data.test_binarization_seed",
        "model": described, "config": config.to_dict(), "images": len(x), "repeats": args.repeats,
        "chunk": args.chunk, "seed": args.seed, "seconds": seconds, "elbo": elbo, "estimators": summary,
        **provenance(), "command": made_by,
    })
    counts_t = torch.tensor(counts, dtype=torch.float64)
    curves = {LABELS[n]: band(estimates[n].mean(-1)) for n in ESTIMATORS}
    first = {LABELS[n]: band(estimates[n][:, :, 0]) for n in ESTIMATORS}
    where = f"epoch {described['epoch']}" if described["checkpoint"] else "a briefly trained small VAE"
    figures.log_likelihood_estimates(
        counts_t, curves, out / "looking_back.png", reference={"ELBO (mean log weight)": elbo},
        title=(f"log p(x) estimates, mean over {len(x)} test images ({where});\n"
               f"line: mean, band: min-max over {args.repeats} repeats"),
        ylabel="estimate of log p(x) (nats/image)", zoom=[LABELS["importance"]])
    figures.log_likelihood_estimates(
        counts_t, first, out / "looking_back_first_image.png",
        reference={"ELBO (mean log weight)": mean_log_weights["importance"][:, 0].mean().item()},
        title=f"the same for the first test image alone;\nband: min-max over {args.repeats} repeats",
        ylabel="estimate of log p(x) (nats)", zoom=[LABELS["importance"]])
    (out / "looking_back.md").write_text("\n".join([
        "# Looking back: two estimates of log p(x)",
        "",
        "Made by",
        "",
        f"    {made_by}",
        "",
        f"Model: {describe(described)}. Test images: the first {len(x)}, binarized once with the fixed test seed.",
        "`looking_back.png`: the test-set mean of each estimate against the number of samples S (mean and",
        "min-max over repeats); `looking_back_first_image.png`: the same for one image.",
        "",
        "Both estimators average unbiased estimates of p(x); their logs are biased low (Jensen), by less",
        "as S grows, so every row is a stochastic lower bound and the curves rise with S. Codes drawn from",
        "the prior rarely explain a given x, so the naive estimate starts far below and climbs slowly with",
        "a wide spread; importance sampling with the encoder starts at the ELBO (S = 1 is a one-sample",
        "ELBO) and rises above it with a much smaller spread (the right panels zoom in on it). The naive",
        "estimator's z are shared by every image (one decode serves all), so it can afford more samples;",
        "the importance sampler decodes S codes per image, hence its separate, smaller budget.",
        "",
        "Test-set mean (nats/image) and its standard deviation over repeats:",
        "",
        "```",
        *lines,
        "```",
        "",
        f"ELBO (mean log weight under q): {elbo:.2f} nats/image. Seconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + ".",
        "",
    ]))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
