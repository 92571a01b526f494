"""Every experiment script runs end to end under --smoke, and a smoke run leaves nothing behind."""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, run_smoke


def _experiment(name):
    """experiments/<name>.py imported as a module (the folders are not packages)."""
    spec = importlib.util.spec_from_file_location(name.replace("/", "."), ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


@pytest.mark.parametrize("script, printed", [("reproductions/mnist_baseline.py", "median training epoch"),
                                             ("benchmarks/benchmark_speed.py", "ratio best hand-coded")])
def test_a_smoke_run_leaves_nothing_behind(mnist_root, tmp_path, script, printed):
    """Without --out/--runs a smoke run writes into a temporary folder and deletes it at the end.

    The default folders (results/..., runs/...) are relative to the working directory, so the script
    runs from an empty one, which must stay empty, as must the temporary root ($TMPDIR). The repository's
    results/ must not change, nor the runs in its runs/ (their files may: a training may be running).
    """
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    results, runs = _files(ROOT / "results"), set((ROOT / "runs").glob("*"))
    env = {**os.environ, "PYROVAE_DATA": str(mnist_root), "TMPDIR": str(tmp)}
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--smoke"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert printed in done.stdout
    assert list(cwd.iterdir()) == []
    # torch may leave its own kernel cache there (torchinductor_<user>); nothing else may remain
    assert [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []
    assert _files(ROOT / "results") == results and set((ROOT / "runs").glob("*")) == runs


def test_mnist_baseline_smoke(mnist_root, tmp_path):
    out = run_smoke("reproductions/mnist_baseline.py", mnist_root, "--runs", str(tmp_path / "runs"),
                    "--out", str(tmp_path / "mnist"))
    assert "median training epoch" in out
    assert (tmp_path / "runs" / "mnist" / "checkpoint.pt").is_file()  # the run is named after the --out folder
    assert json.loads((tmp_path / "mnist" / "summary.json").read_text())["final"]["epoch"] == 1


def test_benchmark_speed_smoke(mnist_root, tmp_path):
    printed = run_smoke("benchmarks/benchmark_speed.py", mnist_root, "--out", str(tmp_path))
    assert "ratio default epoch (loop/meanfield) / floor" in printed and "the default (pyrovae train)" in printed and "CIFAR-10 model" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    epoch = results["epoch"]["seconds_per_epoch"]
    assert {"stock", "loop/trace_elbo", "loop/meanfield_elbo", "loop/elbo", "loop/meanfield", "hand/plain",
            "floor/blas", "floor/onednn", "floor"} <= set(epoch)
    assert epoch["floor"] == min(epoch["floor/blas"], epoch["floor/onednn"])
    assert len(results["scaling"]) == 2 and (tmp_path / "scaling.png").is_file()
    assert {"step_ms", "convolutions_ms", "ratio"} <= set(results["cifar10"]) and results["machine"]["cpu"]
    assert "default Pyro objective (meanfield) / best hand-coded" in results["epoch"]["ratios"]
    per_step = results["epoch"]["per_step"]  # from the profiler: Pyro's objectives run more operators
    assert per_step["stock"]["operators"] > per_step["hand/plain"]["operators"] > 0
    assert "numpyro" in results["epoch"]


def test_numpyro_epochs_take_turns_with_ours_in_a_process_kept_running():
    """The NumPyro row of the speed benchmark: compiled once, then one epoch per call (jax and numpyro are
    an optional extra, so this runs only where they are installed)."""
    pytest.importorskip("numpyro")
    speed = _experiment("benchmarks/benchmark_speed")
    images = torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8)
    lines = []
    epochs = speed.NumPyroEpochs.start(images, 256, lines.append)
    epochs(None)
    epochs(None)
    row = epochs.close()
    assert len(row["seconds"]) == 3 and row["interleaved"] and epochs.process.returncode == 0
    assert row["seconds_per_epoch"] == statistics.median(row["seconds"][1:])
    assert all(math.isfinite(v) for v in row["neg_elbo"]) and row["steps"] == 2 and "first epoch" in lines[0]


def test_benchmark_whole_run_smoke(mnist_root, tmp_path):
    printed = run_smoke("benchmarks/benchmark_whole_run.py", mnist_root, "--out", str(tmp_path))
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert set(runs) == {"first run", "second run"} and "second run" in printed
    assert runs["first run"]["test_neg_elbo"] == runs["second run"]["test_neg_elbo"]  # the same run, twice


def test_prior_grid_smoke(mnist_root, tmp_path):
    out = run_smoke("studies/prior_likelihood_grid.py", mnist_root, "--out", str(tmp_path / "out"),
                    "--runs", str(tmp_path / "r"))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    from pyrovae.priors import PRIORS

    assert set(results["priors"]) == set(PRIORS)
    assert "vamp vs the standard Normal prior" in out


def test_cifar10_smoke(mnist_root, tmp_path):
    if not (mnist_root / "cifar10").is_dir():
        pytest.skip(f"no CIFAR-10 under {mnist_root}")
    out = run_smoke("reproductions/cifar10_conv.py", mnist_root, "--runs", str(tmp_path / "runs"),
                    "--out", str(tmp_path / "cifar10"))
    assert "bits/dim" in out
    figures = ("samples.png", "classes.png", "interpolation.png", "loss_curve.png", "reconstructions.png")
    for name in figures:
        assert (tmp_path / "cifar10" / name).is_file(), name
        (tmp_path / "cifar10" / name).unlink()
    assert (tmp_path / "runs" / "cifar10" / "checkpoint.pt").is_file()
    again = run_smoke("reproductions/cifar10_conv.py", mnist_root, "--runs", str(tmp_path / "runs"),
                      "--out", str(tmp_path / "cifar10"), "--figures-only")
    assert "figures of" in again
    for name in figures[:4]:
        assert (tmp_path / "cifar10" / name).is_file(), name


def test_cifar10_ladder_smoke_draws_the_layers_figure(mnist_root, tmp_path):
    if not (mnist_root / "cifar10").is_dir():
        pytest.skip(f"no CIFAR-10 under {mnist_root}")
    out = run_smoke("reproductions/cifar10_conv.py", mnist_root, "--config", "experiments/configs/cifar10_ladder.toml",
                    "--out", str(tmp_path / "ladder"))
    assert "bits/dim" in out
    assert all((tmp_path / "ladder" / name).is_file() for name in ("samples.png", "layers.png", "interpolation.png"))


@pytest.mark.slow
def test_benchmark_distributed_smoke(mnist_root, tmp_path):
    printed = run_smoke("benchmarks/benchmark_distributed.py", mnist_root, "--out", str(tmp_path))
    assert "communication share" in printed and "-log p(x)" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["communication"]) == {"default (400)", "10x wider (4000)"}
    assert not (tmp_path / "two_processes.json").exists()


def test_benchmark_iwae_smoke(mnist_root, tmp_path):
    out = run_smoke("benchmarks/benchmark_iwae.py", mnist_root, "--out", str(tmp_path))
    assert "ratios: ours/stock" in out and "peak resident memory" in out
    assert json.loads((tmp_path / "results.json").read_text())["k"] == 20


def test_benchmark_mixture_smoke(mnist_root, tmp_path):
    out = run_smoke("benchmarks/benchmark_mixture.py", mnist_root, "--out", str(tmp_path))
    assert "ratio ours/stock" in out
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["components"] == 20 and result["max_abs_error_nats"]["ours"] < 1e-3


def test_reproduce_smoke_writes_a_table_beside_the_published_figures(mnist_root, tmp_path):
    run_smoke("reproductions/reproduce.py", mnist_root, "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"))
    table = (tmp_path / "out" / "README.md").read_text()
    for name, published in (("burda_vae", "86.76"), ("burda_iwae50", "84.78"), ("tomczak_vamp", "85.57")):
        assert f"`{name}`" in table and published in table
    assert "`best_one_layer`" in table
    vamp = json.loads((tmp_path / "out" / "tomczak_vamp.json").read_text())
    assert vamp["config"]["model"]["prior_options"] == {"components": 5} and vamp["k"] == 10
    best = json.loads((tmp_path / "out" / "best_one_layer.json").read_text())
    assert best["config"]["model"]["prior_options"] == {"components": 5} and best["objective"] == "iwae"


def test_reproduce_train_continues_a_run_from_its_checkpoint(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PYROVAE_DATA", str(mnist_root))
    reproduce = _experiment("reproductions/reproduce")
    tiny = ["train.train_subset=200", "train.test_subset=50"]
    first = reproduce.train("burda_iwae5", tmp_path, epochs=1, overrides=tiny, quiet=True)
    second = reproduce.train("burda_iwae5", tmp_path, epochs=2, quiet=True)  # the saved config is kept
    assert [row["epoch"] for row in second.metrics["epochs"]] == [1, 2]
    assert second.metrics["epochs"][0] == first.metrics["epochs"][0]
    assert second.config.train.train_subset == 200


def test_reproduce_scales_the_files_schedule_but_not_milestones_given_on_the_command_line(tmp_path, monkeypatch):
    """``--epochs 280 --set train.lr_milestones=[140, 190]`` decays after epochs 140 and 190, not 19 and 27."""
    reproduce = _experiment("reproductions/reproduce")
    monkeypatch.setattr(reproduce, "train_run", lambda config, out, **kw: config)
    given = reproduce.train("two_layer_vamp", tmp_path, epochs=280, quiet=True,
                            overrides=["train.lr_milestones=[140, 190]", "train.lr_decay=0.5"])
    assert given.train.epochs == 280 and given.train.lr_milestones == (140, 190) and given.train.lr_decay == 0.5
    scaled = reproduce.train("burda_vae", tmp_path, epochs=1400, quiet=True, overrides=["train.lr=0.002"])
    assert scaled.train.lr_milestones == (1, 2, 6, 17, 52, 155, 467) and scaled.train.lr == 0.002


def test_reproduce_table_replaces_only_its_own_block(tmp_path):
    reproduce = _experiment("reproductions/reproduce")
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\nhand-written text\n")
    reproduce.write_table(readme, "| first |")
    reproduce.write_table(readme, "| second |")
    text = readme.read_text()
    assert text.startswith("# Results\n\nhand-written text\n") and "| second |" in text and "| first |" not in text
    assert text.count(reproduce.MARKERS[0]) == 1 and text.count(reproduce.MARKERS[1]) == 1


def test_reproduce_scales_burdas_schedule_to_a_shorter_budget():
    reproduce = _experiment("reproductions/reproduce")
    config = reproduce.config_for("burda_vae")
    assert config.train.epochs == 3280 and config.train.lr_milestones == (1, 4, 13, 40, 121, 364, 1093)
    assert abs(config.train.lr_decay ** 7 - 0.1) < 1e-12  # ten times smaller after the seven decays
    short = reproduce.compress_schedule(config, 1400)
    assert short.train.epochs == 1400 and short.train.lr_milestones == (1, 2, 6, 17, 52, 155, 467)
    tiny = reproduce.compress_schedule(config, 1).train.lr_milestones  # still increasing whole epochs
    assert tiny == (1, 2, 3, 4, 5, 6, 7)
    assert reproduce.compress_schedule(config, 3280) == config


def test_reproduce_report_evaluates_a_checkpoint_once(mnist_root, tmp_path, monkeypatch):
    """A run that has not moved since its figures were written is not evaluated again; one that has is."""
    monkeypatch.setenv("PYROVAE_DATA", str(mnist_root))
    reproduce = _experiment("reproductions/reproduce")
    tiny = ["train.train_subset=200", "train.test_subset=50"]
    reproduce.train("burda_vae", tmp_path / "runs", epochs=1, overrides=tiny, quiet=True)
    args = dict(runs=tmp_path / "runs", out=tmp_path / "out", test_images=20, readme=None, command="test")
    first = reproduce.report(["burda_vae"], k=3, **args)

    def must_not_run(*a, **kw):
        raise AssertionError("evaluated again")

    real = reproduce.report_run
    monkeypatch.setattr(reproduce, "report_run", must_not_run)
    again = reproduce.report(["burda_vae"], k=3, **args)
    assert again[0]["neg_log_likelihood"] == first[0]["neg_log_likelihood"]
    with pytest.raises(AssertionError, match="evaluated again"):  # another K is another figure
        reproduce.report(["burda_vae"], k=4, **args)
    monkeypatch.setattr(reproduce, "report_run", real)
    reproduce.train("burda_vae", tmp_path / "runs", epochs=2, quiet=True)  # the run moves on
    later = reproduce.report(["burda_vae"], k=3, **args)
    assert later[0]["epochs"] == 2


def test_a_report_keeps_the_figures_of_a_run_whose_checkpoint_is_elsewhere(tmp_path):
    """The table lists a run evaluated before (its NAME.json) even where its checkpoint is not: a report
    on another machine does not drop finished rows."""
    reproduce = _experiment("reproductions/reproduce")
    out = tmp_path / "out"
    out.mkdir()
    row = {"name": "burda_vae", "published": 86.76, "published_source": "Burda", "neg_log_likelihood": 87.3, "k": 5000,
           "test_images": 10000, "iwae_seconds": 1.0, "neg_elbo": 90.9, "active_units": 16, "z_dim": 50,
           "epochs": 3280, "epochs_planned": 3280, "train_seconds": 3600.0, "objective": "meanfield_elbo",
           "particles": 5, "curve": [100.0, 95.0]}
    (out / "burda_vae.json").write_text(json.dumps(row))
    rows = reproduce.report(["burda_vae"], tmp_path / "runs", out, 5000, None, readme=tmp_path / "README.md",
                            command="test")
    assert rows == [row] and "**87.30**" in (tmp_path / "README.md").read_text()


def test_the_vamp_crosscheck_agrees_with_stock_pyro_in_smoke_form():
    out = run_smoke("studies/crosscheck_vamp.py", None)
    ours, stock = (float(out.split(name)[1].split()[0]) for name in ("ours", "stock"))
    assert abs(ours - stock) < 1e-3 and "IWAE-20" in out


def test_benchmark_batch_size_smoke():
    out = run_smoke("benchmarks/benchmark_batch_size.py", None)
    assert "batch    8:" in out and "ratio to the cheapest  1.00" in out


_PARSE_ONLY = r"""
import argparse, json, runpy, sys
class Parsed(BaseException):
    pass
original = argparse.ArgumentParser.parse_args
def parse_only(self, args=None, namespace=None):
    original(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_only
refused = []
for script, argv in json.loads(sys.argv[1]):
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
        refused.append([script, argv, "ran without parsing its command line"])
    except Parsed:
        pass
    except SystemExit as e:
        refused.append([script, argv, f"exit {e.code}"])
print(json.dumps(refused))
"""


def _documented_commands():
    """(script, arguments) of every ``python experiments/...py`` or ``python tools/...py`` command in
    the project's Markdown: the READMEs, docs/ and every results folder's README."""
    import re
    import shlex

    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "results").rglob("*.md"),
             *(ROOT / "experiments").rglob("*.md"), *(ROOT / "tools").rglob("*.md")]
    found = set()
    for page in pages:
        text = re.sub(r"\\\n\s*", " ", page.read_text())  # continued lines joined
        for m in re.finditer(r'python3? ((?:experiments|tools)/[\w/]+\.py)((?:[^`&|#<>"\n]|"[^"\n]*")*)', text):
            argv = shlex.split(m.group(2).replace("$OUT", "/tmp/out").replace(" NAME", " burda_vae"))
            found.add((m.group(1), tuple(a for a in argv if a not in ('"', "'"))))
    return sorted(found)


def test_every_documented_experiment_command_is_accepted_by_its_script():
    """The commands the READMEs and results folders give are checked against the scripts' own parsers."""
    commands = _documented_commands()
    assert len(commands) >= 30 and any("crosscheck_vamp" in s for s, _ in commands)
    missing = sorted({s for s, _ in commands if not (ROOT / s).is_file()})
    assert missing == [], f"documented scripts that do not exist: {missing}"
    done = subprocess.run([sys.executable, "-c", _PARSE_ONLY, json.dumps(commands)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    refused = json.loads(done.stdout.strip().splitlines()[-1])
    assert refused == [], refused
