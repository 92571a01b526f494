"""The whole default run, start-up to the last figure: ``pyrovae train`` timed as a user meets it.

Each variant is the same command (the default model and budget unless ``--args`` says otherwise), run
in a process of its own, one after another in one sitting:

- ``baseline`` (with ``--baseline-src DIR``): the code in DIR (a checkout of an earlier commit, put
  first on ``PYTHONPATH``), the same command;
- ``first run``: this code with an empty compile cache (``TORCHINDUCTOR_CACHE_DIR`` a new folder),
  so tracing and compiling are paid in full;
- ``second run``: this code again with the cache the first run left (what a user's next run pays).

    python experiments/benchmarks/benchmark_whole_run.py --baseline-src /tmp/old --out results/benchmark/whole_run

Writes ``results.json`` (wall seconds, the per-epoch seconds and the final test -ELBO of every run,
their ratios to the baseline, the machine) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyrovae.experiment import add_output_flags, command, output_folders
from pyrovae.atomic import write_json
from pyrovae.provenance import provenance

OUT = "results/benchmark/whole_run"


def timed_run(args: list[str], run: Path, env: dict) -> dict:
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pyrovae", "train", "--out", str(run), "--quiet", *args],
                          capture_output=True, text=True, env=env, cwd=run.parent)  # not the checkout: PYTHONPATH decides
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"pyrovae train failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    metrics = json.loads((run / "metrics.json").read_text())
    epochs = metrics["epochs"]
    return {"wall_seconds": round(wall, 2), "epoch_seconds": [round(e["seconds"], 3) for e in epochs],
            "test_neg_elbo": epochs[-1]["test_neg_elbo"] if epochs else None, "notes": done.stdout.strip().splitlines()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", help="a checkout of earlier code to compare with (its folder)")
    parser.add_argument("--args", default="", help="more arguments for pyrovae train, in one string")
    add_output_flags(parser, out=OUT, smoke="1 epoch on 512 images")
    args = parser.parse_args(argv)
    extra = shlex.split(args.args) + (["--epochs", "1", "--train-subset", "512", "--test-subset", "256"]
                                      if args.smoke else [])
    with output_folders(args.smoke, args.out, default_out=OUT) as folders, \
            tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        base_env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(scratch / "cache")}
        if "PYROVAE_DATA" in base_env:
            base_env["PYROVAE_DATA"] = str(Path(base_env["PYROVAE_DATA"]).resolve())
        plan = ([("baseline", {**base_env, "PYTHONPATH": os.pathsep.join(
            [str(Path(args.baseline_src).resolve()), base_env.get("PYTHONPATH", "")])})] if args.baseline_src else [])
        plan += [("first run", base_env), ("second run", base_env)]
        runs = {}
        for name, env in plan:
            runs[name] = timed_run(extra, scratch / name.replace(" ", "_"), env)
            print(f"{name:11s} {runs[name]['wall_seconds']:8.1f} s in all; epochs "
                  f"{sum(runs[name]['epoch_seconds']):.1f} s; test -ELBO {runs[name]['test_neg_elbo']:.2f}", flush=True)
        if "baseline" in runs:
            for name in ("first run", "second run"):
                runs[name]["wall_ratio_to_baseline"] = runs[name]["wall_seconds"] / runs["baseline"]["wall_seconds"]
                print(f"{name} / baseline: {runs[name]['wall_ratio_to_baseline']:.3f}")
        folders.out.mkdir(parents=True, exist_ok=True)
        write_json(folders.out / "results.json", {"runs": runs, "train_args": extra, **provenance("cpu"),
                                                  "command": command(__file__, argv)})


if __name__ == "__main__":
    main()
