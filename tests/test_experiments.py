"""Every experiment script runs end to end under --smoke."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def _smoke(script, mnist_root, *args):
    result = subprocess.run([sys.executable, f"experiments/{script}", "--smoke", *args], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYROVAE_DATA": str(mnist_root)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_mnist_baseline_smoke(mnist_root, tmp_path):
    result = subprocess.run(
        [sys.executable, "experiments/mnist_baseline.py", "--smoke", "--run-dir", str(tmp_path / "run"),
         "--results", str(tmp_path / "results")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYROVAE_DATA": str(mnist_root)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "median training epoch" in result.stdout
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_benchmark_epoch_smoke(mnist_root):
    result = subprocess.run([sys.executable, "experiments/benchmark_epoch.py", "--smoke"], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYROVAE_DATA": str(mnist_root)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ratio pyrovae/stock" in result.stdout


def test_prior_grid_smoke(mnist_root, tmp_path):
    out = _smoke("prior_likelihood_grid.py", mnist_root, "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "r"))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    from pyrovae.priors import PRIORS

    assert set(results["priors"]) == set(PRIORS)
    assert "vamp vs the standard Normal prior" in out


def test_cifar10_smoke(mnist_root, tmp_path):
    if not (mnist_root / "cifar10").is_dir():
        pytest.skip(f"no CIFAR-10 under {mnist_root}")
    out = _smoke("cifar10_conv.py", mnist_root, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    assert "bits/dim" in out
    assert (tmp_path / "out" / "samples.png").is_file()
