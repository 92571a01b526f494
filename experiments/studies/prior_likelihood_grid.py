"""Every registered prior on binarized MNIST with the same budget: test -ELBO and -log p(x).

Each prior trains the same network (784-400-50 unless flags say otherwise, Bernoulli likelihood,
dynamic binarization) for the same number of epochs and seed; then the test -ELBO (all test images,
fixed binarization) and -log p(x) by importance sampling with K samples (the first ``--test-images``
test images) are reported per image in nats.

    python experiments/studies/prior_likelihood_grid.py --epochs 10 --particles 1000
    python experiments/studies/prior_likelihood_grid.py --smoke
"""

from __future__ import annotations

import argparse
import sys

from pyrovae.config import Config
from pyrovae.evaluate import importance_log_likelihood
from pyrovae.experiment import add_output_flags, output_folders
from pyrovae.priors import PRIORS
from pyrovae.atomic import write_json
from pyrovae.provenance import provenance
from pyrovae.runs import train_run

#: small options so that every prior fits the budget (the VampPrior's K is the paper's 500)
PRIOR_OPTIONS = {"mog": {"components": 10}, "vamp": {"components": 500}, "flow": {"flows": 2}}
OUT, RUNS = "results/prior_grid", "runs/prior_grid"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--priors", default=",".join(PRIORS), help="comma-separated prior names")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--particles", dest="k", type=int, default=1000, help="importance samples per image")
    p.add_argument("--test-images", type=int, default=2000, help="test images for the -log p(x) estimate")
    p.add_argument("--seed", type=int, default=0)
    add_output_flags(p, out=OUT, runs=RUNS, smoke="1 epoch on 512 images, K=5 on 50 test images")
    args = p.parse_args(argv)

    priors = [name.strip() for name in args.priors.split(",") if name.strip()]
    unknown = [name for name in priors if name not in PRIORS]
    if unknown:
        p.error(f"unknown prior(s) {unknown}; valid: {', '.join(PRIORS)}")
    train = {"epochs": args.epochs, "seed": args.seed}
    k, test_images = args.k, args.test_images
    if args.smoke:
        train.update(epochs=1, train_subset=512, test_subset=200)
        k, test_images = 5, 50
    with output_folders(args.smoke, args.out, args.runs, default_out=OUT, default_runs=RUNS) as folders:
        rows = {}
        for name in priors:
            options = PRIOR_OPTIONS.get(name, {})
            if args.smoke and name == "vamp":
                options = {"components": 10}
            config = Config().replace(model={"prior": name, "prior_options": options}, train=train)
            trained = train_run(config, folders.runs / name, overwrite=True, quiet=True)
            iwae = importance_log_likelihood(trained.vae, trained.data.test[:test_images], k=k)
            metrics = trained.metrics
            last = metrics["epochs"][-1]
            rows[name] = {"test_neg_elbo": last["test_neg_elbo"], "test_kl": last["test_kl"],
                          "neg_log_likelihood": iwae["neg_log_likelihood"], "k": k, "iwae_test_images": test_images,
                          "options": options, "train_seconds": sum(r["seconds"] for r in metrics["epochs"]),
                          "curve": [r["test_neg_elbo"] for r in metrics["epochs"]]}
            print(f"{name:16s} test -ELBO {last['test_neg_elbo']:8.2f}   -log p(x) (K={k}) "
                  f"{iwae['neg_log_likelihood']:8.2f} nats/image   ({rows[name]['train_seconds']:.0f} s training)",
                  flush=True)
        if "normal" in rows:
            base = rows["normal"]["neg_log_likelihood"]
            for name in ("mog", "vamp", "flow"):
                if name in rows:
                    gap = base - rows[name]["neg_log_likelihood"]
                    verdict = "better" if gap > 0 else "NOT better"
                    print(f"{name} vs the standard Normal prior: {gap:+.2f} nats ({verdict})")
        out = folders.out
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", {"budget": {"epochs": train["epochs"], "seed": args.seed, "k": k,
                                                     "iwae_test_images": test_images},
                                          "data": "MNIST, dynamic binarization; test set binarized once (seed 0)",
                                          "units": "nats per image", "priors": rows, **provenance()})
        from pyrovae import plots

        plots.curves({name: r["curve"] for name, r in rows.items()}, out / "test_curves.png",
                     ylabel="test -ELBO per image (nats)", title="priors at equal budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
