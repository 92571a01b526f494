"""The information-theory experiments run end to end under --smoke, as subprocesses."""

from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import ROOT, run_smoke


def test_information_theory_smoke(tmp_path):
    stdout = run_smoke("studies/information_theory.py", None, "--out", str(tmp_path))
    for name in ("coin_entropy.png", "surprise.png", "gaussian_kl.png", "claims.json", "README.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert claims["claims"] and all(c["holds"] for c in claims["claims"])
    assert "information_theory.py --smoke" in claims["command"]
    assert "FAIL" not in stdout
    assert "information_theory.py --smoke" in (tmp_path / "README.md").read_text()


@pytest.mark.mnist
def test_looking_back_smoke(tmp_path, mnist_root):
    stdout = run_smoke("studies/looking_back.py", mnist_root, "--out", str(tmp_path), "--threads", "1")
    for name in ("looking_back.png", "looking_back_first_image.png", "looking_back.json", "looking_back.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = json.loads((tmp_path / "looking_back.json").read_text())
    assert report["estimators"]["naive"]["counts"] == [1, 10, 100, 1000]
    assert report["estimators"]["importance"]["counts"] == [1, 10, 100]
    assert len(report["estimators"]["naive"]["test_mean_per_repeat"][0]) == report["repeats"]
    assert "looking_back.py --smoke" in report["command"] and report["versions"]["torch"]
    assert "importance" in stdout


def test_looking_back_skips_cleanly_without_mnist(tmp_path, monkeypatch, capsys):
    # in-process (the subprocess path is covered above): only the data lookup runs before the skip
    spec = importlib.util.spec_from_file_location("looking_back", ROOT / "experiments" / "studies" / "looking_back.py")
    looking_back = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(looking_back)
    empty = tmp_path / "no_data"
    empty.mkdir()
    monkeypatch.setenv("PYROVAE_DATA", str(empty))
    out = tmp_path / "out"
    assert looking_back.main(["--smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipping" in printed and "MNIST" in printed
    assert not out.exists()
