"""The command line, in process and as a subprocess: outputs, and clear errors for bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, image_folder
from pyrovae.cli import main

QUICK = ["--epochs", "1", "--hidden", "32", "--quiet"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[str]:
    """The flags that point a command at a small synthetic image folder (no MNIST needed)."""
    folder = image_folder(tmp_path_factory.mktemp("images"), n_train=512, n_test=200)
    return ["--dataset", f"folder:{folder}"]


def _pyrovae(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pyrovae", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_train_2d_writes_every_output_then_evaluate_and_sample(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--z-dim", "2", *dataset, "--out", str(out), *QUICK]) == 0
    for name in ("config.json", "metrics.json", "checkpoint.pt", "loss_curve.png", "reconstructions.png",
                 "samples.png", "manifold.png", "latent_scatter.png"):
        assert (out / name).stat().st_size > 0, name
    assert main(["evaluate", str(out / "checkpoint.pt"), "--particles", "20"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["test"]["neg_log_likelihood"] < evaluation["test"]["neg_elbo"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert evaluation["test"]["neg_elbo"] == pytest.approx(metrics["epochs"][-1]["test_neg_elbo"], abs=1e-4)
    assert main(["sample", str(out), "--out", str(tmp_path / "s"), "--n", "16"]) == 0
    assert (tmp_path / "s" / "samples.png").is_file()
    assert "test -ELBO" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli(dataset, tmp_path):
    result = _pyrovae("train", *dataset, "--out", str(tmp_path / "r"), *QUICK)
    assert result.returncode == 0, result.stderr
    assert "outputs in" in result.stdout


@pytest.mark.parametrize("flag,value,needle", [
    ("--lr", "-1", "train.lr must be a positive learning rate such as 1e-3, got -1.0"),
    ("--lr", "abc", "--lr: expected a number such as 1e-3, got 'abc'"),
    ("--prior", "cauchy", "unknown model.prior 'cauchy'"),
    ("--z-dim", "0", "model.z_dim must be a positive integer (the latent size), got 0"),
    ("--z-dim", "2.5", "--z-dim: expected an integer, got '2.5'"),
    ("--batch-size", "-5", "train.batch_size must be a positive integer"),
    ("--hidden", "400,0", "--hidden: must be a positive integer, got 0"),
    ("--activation", "swish", "unknown model.activation 'swish'; valid: elu, gelu, relu, softplus, tanh"),
    ("--device", "tpu", "train.device must be one of auto, cpu, cuda; got 'tpu'"),
])
def test_nonsense_flag_values_are_refused_clearly(flag, value, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["train", flag, value, "--out", str(tmp_path / "never")])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_missing_dataset_offline_is_one_message_without_traceback(tmp_path):
    result = _pyrovae("train", "--train-subset", "512", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), *QUICK)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "MNIST was not found in" in result.stderr and "t10k-images-idx3-ubyte" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content,needle", [
    (b"", "could not be read"),
    (b"not a checkpoint at all", "could not be read"),
    (None, "not a pyrovae checkpoint"),
])
def test_bad_checkpoints_are_refused_clearly(tmp_path, capsys, content, needle):
    path = tmp_path / "checkpoint.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    assert main(["sample", str(path), "--out", str(tmp_path / "s")]) == 1
    assert needle in capsys.readouterr().err


def test_truncated_checkpoint_is_refused(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *dataset, "--out", str(out), *QUICK]) == 0
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert main(["evaluate", str(out)]) == 1
    assert "truncated, corrupt or not a checkpoint" in capsys.readouterr().err


def test_missing_checkpoint_is_refused(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope.pt")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


def test_existing_run_folder_is_refused_without_overwrite(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *dataset, "--out", str(out), *QUICK]) == 0
    before = (out / "metrics.json").read_text()
    assert main(["train", *dataset, "--out", str(out), "--lr", "0.01", *QUICK]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "r"), *QUICK]) == 1
    assert "no CUDA GPU is available" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_train_flags_are_the_config_fields_that_declare_one():
    """One schema: every flag comes from a config field's metadata and sets that field, and nothing else."""
    from pyrovae.cli import build_parser, config_flags, config_from_args
    from pyrovae.config import Config

    samples = {"int": "3", "float": "0.5", "bool": None, "str": "x", "tuple[int": "7,8", "tuple[str": "m"}
    flags = config_flags()
    assert len(flags) >= 25 and len({flag for flag, _, _ in flags}) == len(flags)
    parser = build_parser()
    for flag, section, f in flags:
        value = next(v for k, v in samples.items() if f.type.split(" |")[0].startswith(k))
        args = parser.parse_args(["train", flag] + ([] if value is None else [value]))
        got = {(s, g.name): getattr(args, f"{s}.{g.name}") for _, s, g in flags}
        assert [key for key, v in got.items() if v is not None] == [(section, f.name)]
        if f.name in ("z_dim", "epochs", "batch_size", "hidden", "tensorboard", "lr", "dataset"):
            config = config_from_args(args)  # values that make a valid config on their own
            expected = {"3": 3, "0.5": 0.5, None: True, "x": "x", "7,8": (7, 8)}[value]
            assert getattr(getattr(config, section), f.name) == expected
            assert config.replace(**{section: {f.name: getattr(getattr(Config(), section), f.name)}}) == Config()
