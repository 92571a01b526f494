"""Every experiment script runs end to end under --smoke."""

import json

import pytest

from conftest import run_smoke


def test_mnist_baseline_smoke(mnist_root, tmp_path):
    out = run_smoke("mnist_baseline.py", mnist_root, "--run-dir", str(tmp_path / "run"),
                    "--results", str(tmp_path / "results"))
    assert "median training epoch" in out
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_benchmark_epoch_smoke(mnist_root):
    assert "ratio pyrovae/stock" in run_smoke("benchmark_epoch.py", mnist_root)


def test_prior_grid_smoke(mnist_root, tmp_path):
    out = run_smoke("prior_likelihood_grid.py", mnist_root, "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "r"))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    from pyrovae.priors import PRIORS

    assert set(results["priors"]) == set(PRIORS)
    assert "vamp vs the standard Normal prior" in out


def test_cifar10_smoke(mnist_root, tmp_path):
    if not (mnist_root / "cifar10").is_dir():
        pytest.skip(f"no CIFAR-10 under {mnist_root}")
    out = run_smoke("cifar10_conv.py", mnist_root, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    assert "bits/dim" in out
    assert (tmp_path / "out" / "samples.png").is_file()
