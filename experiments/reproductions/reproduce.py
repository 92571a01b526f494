"""Reproduce the MNIST figures of Burda et al. (2015) and Tomczak and Welling (2018), one and two stochastic layers.

Each reproduction is a config in ``experiments/configs/`` and a resumable run in ``runs/reproduce/``:

    burda_vae      784-200-200-50 tanh VAE, the ELBO           Burda et al. 2015, Table 1: 86.76
    burda_iwae5    the same network, IWAE objective, K=5        85.54
    burda_iwae50   the same network, IWAE objective, K=50       84.78
    tomczak_vamp   300-300-40 softplus VAE, VampPrior (K=500)   Tomczak and Welling 2018: 85.57
    best_one_layer tomczak_vamp trained with IWAE, K=5          to beat: 84.78 (Burda, best one layer)
    burda_dreg5    burda_iwae5 with doubly reparameterized gradients (DReG)
    two_layer_top_down   latents 100 and 50, top-down guide     Burda et al. 2015, two layers, VAE: 85.33
    two_layer_bottom_up  the same with the bottom-up guide
    two_layer_vamp       two_layer_bottom_up with a VampPrior   to beat: 82.5 (Burda, two layers, IWAE k=50: 82.90)
    two_layer_vamp_top_down  the same with the top-down guide (stopped early)
    two_layer_iwae5      two_layer_bottom_up with the IWAE bound, K=5   Burda et al. 2015, two layers, IWAE k=5: 83.89
    two_layer_top_down_residual  two_layer_top_down with NVAE's residual top-down guide
    two_layer_vamp_residual  the residual top-down guide, a VampPrior and IWAE (K=5)   to beat: 82.5
    two_layer_vamp_iwae5     the bottom-up guide, a VampPrior and IWAE (K=5)           to beat: 82.5
    two_layer_vamp_dreg5     two_layer_vamp_iwae5 with doubly reparameterized gradients (DReG)
    two_layer_vamp_dreg5_skip  the same, its decoder reading z1 and the top-down path, p(x | z1, h(z2))

Train (or continue, from the last epoch's checkpoint) one of them, for as long as the budget allows;
a run stopped by Ctrl-C, SIGTERM or a crash continues from where it was with the same command:

    PYROVAE_DATA=../shared/data python experiments/reproductions/reproduce.py train burda_vae

Then evaluate every run's latest checkpoint the way the papers do (-log p(x) by IWAE-5000 on the
10,000 test images, MNIST binarized dynamically for training and once, with a fixed seed, for
testing) and write ``results/reproduce/`` and the table in ``results/README.md``:

    PYROVAE_DATA=../shared/data python experiments/reproductions/reproduce.py report --particles 5000

``--smoke`` trains each config for one epoch on a few images and reports IWAE-10, into temporary
folders unless ``--runs``/``--out`` say where.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pyrovae.checkpoint import load_checkpoint
from pyrovae.config import Config, apply_overrides, read_config_file
from pyrovae.experiment import add_output_flags, command, output_folders
from pyrovae.atomic import write_json
from pyrovae.provenance import provenance
from pyrovae.runs import TrainedRun, evaluate_run, train_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OUT, RUNS = "results/reproduce", "runs/reproduce"

#: name -> (the published figure it is set against, -log p(x) in nats by IWAE-5000)
PUBLISHED = {
    "burda_vae": ("Burda et al. 2015, Table 1, one layer, VAE k=1", 86.76),
    "burda_iwae5": ("Burda et al. 2015, Table 1, one layer, IWAE k=5", 85.54),
    "burda_iwae50": ("Burda et al. 2015, Table 1, one layer, IWAE k=50", 84.78),
    "tomczak_vamp": ("Tomczak and Welling 2018, Table 1, VampPrior, one layer", 85.57),
    "best_one_layer": ("the best one-layer figure of Burda et al. 2015, Table 1 (IWAE k=50)", 84.78),
    "burda_dreg5": ("Burda et al. 2015, Table 1, one layer, IWAE k=5", 85.54),
    "two_layer_top_down": ("Burda et al. 2015, Table 1, two layers, VAE k=1", 85.33),
    "two_layer_bottom_up": ("Burda et al. 2015, Table 1, two layers, VAE k=1", 85.33),
    "two_layer_vamp": ("Burda et al. 2015, Table 1, two layers, IWAE k=50 (the target: 82.5)", 82.90),
    "two_layer_vamp_top_down": ("Burda et al. 2015, Table 1, two layers, IWAE k=50", 82.90),
    "two_layer_iwae5": ("Burda et al. 2015, Table 1, two layers, IWAE k=5", 83.89),
    "two_layer_top_down_residual": ("Burda et al. 2015, Table 1, two layers, VAE k=1", 85.33),
    "two_layer_vamp_residual": ("Burda et al. 2015, Table 1, two layers, IWAE k=50 (the target: 82.5)", 82.90),
    "two_layer_vamp_iwae5": ("Burda et al. 2015, Table 1, two layers, IWAE k=50 (the target: 82.5)", 82.90),
    "two_layer_vamp_dreg5": ("Burda et al. 2015, Table 1, two layers, IWAE k=50 (the target: 82.5)", 82.90),
    "two_layer_vamp_dreg5_skip": ("Burda et al. 2015, Table 1, two layers, IWAE k=50 (the target: 82.5)", 82.90),
}
MARKERS = ("<!-- reproduce:begin -->", "<!-- reproduce:end -->")


def config_for(name: str) -> Config:
    return Config.from_dict(read_config_file(CONFIGS / f"{name}.toml"))


def compress_schedule(config: Config, epochs: int) -> Config:
    """``config`` trained for ``epochs`` epochs, its learning-rate milestones scaled by epochs / planned.

    Burda et al.'s schedule (stages of 3^i epochs) squeezed into a shorter budget keeps its shape: the
    same decays, at the same fractions of the run. Milestones stay increasing whole epochs >= 1.
    """
    factor = epochs / config.train.epochs
    milestones = []
    for m in config.train.lr_milestones:
        milestones.append(max(round(m * factor), milestones[-1] + 1 if milestones else 1))
    return config.replace(train={"epochs": epochs, "lr_milestones": tuple(milestones)})


def train(name: str, runs: Path, epochs: int | None, overrides: list[str] = (), quiet: bool = False) -> TrainedRun:
    """Start the run ``runs/name`` or, if it has a checkpoint, continue it to ``epochs`` epochs in all.

    A new run planned for fewer (or more) epochs than its config's has its learning-rate schedule
    scaled to that budget (``compress_schedule``); a continued run keeps the schedule it started with.
    The scaling applies to the config file's schedule only: milestones given in ``overrides`` are
    epoch counts of this run, used as they are.
    """
    out = runs / name
    if (out / "checkpoint.pt").is_file():
        saved = Config.from_dict(load_checkpoint(out / "checkpoint.pt")["config"])
        budget = saved.replace(train={"epochs": epochs or saved.train.epochs})
        return train_run(budget, out, resume=True, quiet=quiet)
    config = config_for(name)
    if epochs and epochs != config.train.epochs:
        config = compress_schedule(config, epochs)
    config = Config.from_dict(apply_overrides(config.to_dict(), list(overrides)))
    if not quiet and epochs and config.train.lr_milestones:
        print(f"{name}: {config.train.epochs} epochs, learning rate times {config.train.lr_decay:g} "
              f"after epochs {list(config.train.lr_milestones)}")
    return train_run(config, out, quiet=quiet, overwrite=True)


def report_run(name: str, runs: Path, k: int, test_images: int | None) -> dict:
    """The figures of one run's latest checkpoint: IWAE-K, -ELBO and its terms, active units, budget."""
    checkpoint = runs / name / "checkpoint.pt"
    evaluated = evaluate_run(checkpoint, device="cpu", particles=k, test_images=test_images)
    test = evaluated["test"]
    saved = load_checkpoint(checkpoint)  # for the training curve; the run may have moved on since, so cut it
    config = Config.from_dict(saved["config"])
    history = saved["state"]["history"][: evaluated["epoch"]]
    source, published = PUBLISHED.get(name, ("", None))
    return {
        "name": name, "published": published, "published_source": source,
        "neg_log_likelihood": test["neg_log_likelihood"], "k": k, "test_images": test["images"],
        "neg_elbo": test["neg_elbo"], "reconstruction": test["reconstruction"], "kl": test["kl"],
        "active_units": test["active_units"], "z_dim": test["z_dim"],
        "epochs": evaluated["epoch"], "epochs_planned": config.train.epochs, "steps": evaluated["step"],
        "train_seconds": sum(row["seconds"] for row in history), "iwae_seconds": test["iwae_seconds"],
        "objective": config.train.objective, "implementation": config.train.implementation,
        "particles": config.train.particles,
        "train_binarization": config.data.binarization, "config": config.to_dict(),
        "curve": [row["test_neg_elbo"] for row in history],
    }


def table(rows: list[dict]) -> str:
    lines = ["| run | objective | published -log p(x) | ours -log p(x) | ours - published | ours test -ELBO | "
             "active units | epochs | training time |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        implementation = r.get("implementation", "traced")
        objective = r["objective"] + (f" (K={r['particles']})" if "iwae" in r["objective"] else "") + (
            f", {implementation}" if implementation != "traced" else "")
        published = f"{r['published']:.2f} ({r['published_source']})" if r["published"] else "-"
        gap = f"{r['neg_log_likelihood'] - r['published']:+.2f}" if r["published"] else "-"
        lines.append(f"| `{r['name']}` | {objective} | {published} | **{r['neg_log_likelihood']:.2f}** "
                     f"(IWAE-{r['k']}, {r['test_images']} images) | {gap} | {r['neg_elbo']:.2f} | {r['active_units']}/{r['z_dim']} "
                     f"| {r['epochs']} of {r['epochs_planned']} | {r['train_seconds'] / 3600:.2f} h |")
    return "\n".join(lines)


def write_table(path: Path, text: str) -> None:
    """Put ``text`` between the markers in ``path`` (appended, with the markers, if they are missing)."""
    block = f"{MARKERS[0]}\n{text}\n{MARKERS[1]}"
    old = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + ("\n\n" if old else "") + block + "\n"
    path.write_text(new)


def earlier_row(path: Path, checkpoint: Path, k: int, test_images: int | None) -> dict | None:
    """The figures in ``path`` if they were computed, with the same K and test images, from the
    checkpoint's present state (same epoch and step); else None. A finished run is evaluated once."""
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    state = load_checkpoint(checkpoint)["state"]
    same = (row.get("epochs"), row.get("steps"), row.get("k"), row.get("test_images_requested", "unknown"))
    return row if same == (state["epoch"], state["step"], k, test_images) else None


def report(names: list[str], runs: Path, out: Path, k: int, test_images: int | None, readme: Path | None,
           command: str) -> list[dict]:
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (runs / name / "checkpoint.pt").is_file():
            if (out / f"{name}.json").is_file():  # evaluated before (perhaps on another machine): kept as it was
                rows.append(json.loads((out / f"{name}.json").read_text()))
                print(f"{name}: no checkpoint in {runs / name}; its figures kept from {out / f'{name}.json'}", flush=True)
            else:
                print(f"{name}: no checkpoint in {runs / name}; train it first", flush=True)
            continue
        row = earlier_row(out / f"{name}.json", runs / name / "checkpoint.pt", k, test_images)
        if row is None:
            row = {**report_run(name, runs, k, test_images), "test_images_requested": test_images}
            write_json(out / f"{name}.json", {**row, "command": command, **provenance("cpu")})
        rows.append(row)
        print(f"{name:14s} -log p(x) {row['neg_log_likelihood']:7.2f} (IWAE-{k}, {row['test_images']} images, "
              f"{row['iwae_seconds']:.0f} s)  test -ELBO {row['neg_elbo']:7.2f}  after {row['epochs']} epochs "
              f"({row['train_seconds'] / 3600:.2f} h)  published {row['published']}", flush=True)
    if not rows:
        return rows
    from pyrovae import plots

    plots.curves({r["name"]: r["curve"] for r in rows}, out / "test_curves.png", ylabel="test -ELBO per image (nats)",
                 title="MNIST (dynamic binarization)", ylim=(80, 130), logx=True)
    (out / "table.md").write_text(table(rows) + "\n")
    if readme is not None:
        write_table(readme, table(rows))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=["train", "report"], default="report")
    parser.add_argument("names", nargs="*", help=f"runs by name (default: all of {', '.join(PUBLISHED)})")
    parser.add_argument("--epochs", type=int, default=None, help="train: epochs in all (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="train: override a config value of a new run, as pyrovae train --set")
    parser.add_argument("--particles", dest="k", type=int, default=5000, help="report: importance samples per image")
    parser.add_argument("--test-images", type=int, default=None, help="report: the first N test images (default all)")
    parser.add_argument("--table", default="results/README.md",
                        help="report: the file whose table (between the reproduce markers) lists these runs")
    add_output_flags(parser, out=OUT, runs=RUNS, smoke="train each config one epoch on 300 images, then report IWAE-10")
    args = parser.parse_args(argv)
    names = args.names or list(PUBLISHED)
    unknown = [n for n in names if not (CONFIGS / f"{n}.toml").is_file()]
    if unknown:
        parser.error(f"no config for {unknown} in {CONFIGS}; known: {', '.join(PUBLISHED)}")
    rerun = command(__file__, argv)

    with output_folders(args.smoke, args.out, args.runs, default_out=OUT, default_runs=RUNS) as (out, runs):
        if args.smoke:
            tiny = ["train.train_subset=300", "train.test_subset=100"]
            for name in names:
                few = ["model.prior_options.components=5"] if config_for(name).model.prior == "vamp" else []
                train(name, runs, epochs=1, overrides=tiny + few, quiet=True)
            # the table goes beside the figures, not into results/README.md
            report(names, runs, out, k=10, test_images=50, readme=out / "README.md", command=rerun)
        elif args.action == "train":
            for name in names:
                train(name, runs, args.epochs, args.overrides)
        else:
            report(names, runs, out, args.k, args.test_images, readme=Path(args.table), command=rerun)
    return 0


if __name__ == "__main__":
    sys.exit(main())
