"""Every experiment script runs end to end under --smoke."""

import os
import subprocess
import sys

from conftest import ROOT


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
