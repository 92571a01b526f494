"""Reliability: bad input and faults each end in a clear error or a clean recovery, losing nothing.

``FAULTS`` lists every case this module proves; ``test_the_module_counts_its_cases`` keeps the count
honest.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

from pathlib import Path

import pyro
import pytest
import torch

from helpers import ROOT, binary_images, image_folder, synthetic_data
from pyrovae.atomic import StorageError
from pyrovae import Config, ModelConfig, build_vae, fit, train_step
from pyrovae.checkpoint import CheckpointError, load_checkpoint, load_vae, save_checkpoint
from pyrovae.build import check_names
from pyrovae.cli import main
from pyrovae.config import ConfigError
from pyrovae.data import DatasetNotFoundError, MNIST_FILES, load_mnist
from pyrovae.likelihoods import DataSupportError
from pyrovae.model import ImageShapeError
from pyrovae.engine import NonFiniteLossError, make_optimizer
from pyrovae.folders import LOCK_NAME, FolderInUseError
from pyrovae.runs import RunFolderError, train_run

FAULTS = []  # the name of every bad input or fault proved below, registered when the module loads


def case(name):
    FAULTS.append(name)
    return name


def faults(*names):
    """Register the cases a test proves."""
    def register(test):
        FAULTS.extend(names)
        return test
    return register


TINY = Config().replace(model={"z_dim": 4, "hidden": (32,)}, train={"batch_size": 100})
DATA = synthetic_data(n_train=600, n_test=100)  # 6 steps an epoch


def _run(out, resume=False, **train):
    return train_run(TINY.replace(train=train), out, data=DATA, quiet=True, resume=resume).metrics


def _params(path):
    return load_checkpoint(path)["model"]


def _rows(metrics):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in metrics["epochs"]]


def _assert_same_run(metrics_a, metrics_b, folder_a, folder_b):
    """Two runs agree bit for bit: every epoch's figures (time aside) and every parameter."""
    assert _rows(metrics_a) == _rows(metrics_b)
    a, b = _params(folder_a / "checkpoint.pt"), _params(folder_b / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- resume, interruption, atomic checkpoints ------------------------------------------------------
@faults("a run stopped after 2 epochs and resumed to 4 equals 4 epochs straight, bit for bit")
def test_resume_is_exact(tmp_path):
    straight = _run(tmp_path / "straight", epochs=4)
    _run(tmp_path / "pieces", epochs=2)
    resumed = _run(tmp_path / "pieces", resume=True, epochs=4)
    _assert_same_run(resumed, straight, tmp_path / "pieces", tmp_path / "straight")
    ca = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["optimizer"]["state"]
    cb = load_checkpoint(tmp_path / "pieces" / "checkpoint.pt")["optimizer"]["state"]
    assert all(torch.equal(ca[i]["exp_avg_sq"], cb[i]["exp_avg_sq"]) for i in ca)


@faults("a run stopped mid-epoch (step budget) and resumed equals the straight run, bit for bit")
def test_step_budget_stops_mid_epoch_and_resumes_exactly(tmp_path):
    straight = _run(tmp_path / "straight", epochs=2)
    partial = _run(tmp_path / "pieces", epochs=2, max_steps=8)
    assert partial["stopped_at_step"] == 8 and len(partial["epochs"]) == 1  # 6 steps an epoch
    state = load_checkpoint(tmp_path / "pieces" / "checkpoint.pt")["state"]
    assert state["step"] == 8 and state["epoch_step"] == 2
    resumed = _run(tmp_path / "pieces", resume=True, epochs=2)
    _assert_same_run(resumed, straight, tmp_path / "pieces", tmp_path / "straight")


@faults("a step budget (or a signal) that ends exactly at the last batch of an epoch, then resume")
def test_a_stop_at_the_last_batch_of_an_epoch_resumes_exactly(tmp_path):
    straight = _run(tmp_path / "straight", epochs=2)
    first = _run(tmp_path / "pieces", epochs=2, max_steps=6)  # 6 steps an epoch: the budget ends epoch 1
    assert len(first["epochs"]) == 1 and "stopped_at_step" not in first
    resumed = _run(tmp_path / "pieces", resume=True, epochs=2)
    _assert_same_run(resumed, straight, tmp_path / "pieces", tmp_path / "straight")


def test_learning_rate_schedule_steps_at_the_milestones_and_resumes_exactly(tmp_path):
    schedule = {"lr_decay": 0.5, "lr_milestones": (1, 2)}
    straight = _run(tmp_path / "straight", epochs=3, **schedule)
    assert [row["lr"] for row in straight["epochs"]] == [1e-3, 5e-4, 2.5e-4]
    state = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [2.5e-4]
    _run(tmp_path / "pieces", epochs=1, **schedule)
    resumed = _run(tmp_path / "pieces", resume=True, epochs=3, **schedule)
    _assert_same_run(resumed, straight, tmp_path / "pieces", tmp_path / "straight")


def _cli_run(args, env):
    """``pyrovae train`` in a child with Ctrl-C at its default: a suite started in the background by a
    shell (``pytest &``) inherits SIGINT ignored, and the child would inherit that too."""
    return subprocess.Popen([sys.executable, "-m", "pyrovae", "train", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(path, proc, timeout=120):
    start = time.time()
    while not path.exists():
        if proc.poll() is not None or time.time() - start > timeout:
            raise AssertionError(f"no {path} (exit {proc.poll()}): {proc.stderr.read() if proc.poll() is not None else ''}")
        time.sleep(0.05)


def _as_version_1(path):
    """Rewrite a checkpoint in the layout of version 1: progress spread over the top level, the
    posterior called the guide."""
    new = load_checkpoint(path)
    state, model_config = new["state"], dict(new["config"]["model"])
    model_config["guide"], model_config["guide_options"] = model_config.pop("posterior"), model_config.pop(
        "posterior_options")
    old = {"format": new["format"], "version": 1, "config": {**new["config"], "model": model_config},
           "image_shape": new["image_shape"], "optimizer": new["optimizer"], "epoch": state["epoch"],
           "model": {k.replace("posterior.", "guide_net.", 1): v for k, v in new["model"].items()},
           "global_step": state["step"], "metrics": state["history"],
           "partial_epoch": {"step": state["epoch_step"], "loss_sum": float(state["loss_sum"]),
                             "images": state["images"], "seconds": state["seconds"], "interrupted": False},
           "rng": {"torch": state["noise_rng"]["torch"], "data_epoch_start": OLD_DATA_RNG, "cuda": None}}
    torch.save(old, path)


#: What versions 1 and 2 kept of the data stream: a CPU generator's state (its size; the values do not matter,
#: since version 3 draws the stream from the seed)
OLD_DATA_RNG = torch.Generator().get_state()


def _as_version_2(path):
    """Rewrite a checkpoint in the layout of version 2: the data generator's state kept, no seed."""
    saved = torch.load(path, weights_only=True)
    state = {k: v for k, v in saved["state"].items() if k != "seed"}
    torch.save({**saved, "version": 2, "state": {**state, "data_rng": OLD_DATA_RNG}}, path)


@faults("a version-1 checkpoint (older pyrovae) loads and resumes exactly")
def test_a_version_1_checkpoint_resumes_exactly(tmp_path):
    straight = _run(tmp_path / "straight", epochs=2)
    _run(tmp_path / "old", epochs=2, max_steps=6)  # saved at the end of epoch 1
    _as_version_1(tmp_path / "old" / "checkpoint.pt")
    resumed = _run(tmp_path / "old", resume=True, epochs=2)
    _assert_same_run(resumed, straight, tmp_path / "old", tmp_path / "straight")


@faults("a version-2 checkpoint saved at an epoch's end resumes exactly",
        "a version-2 checkpoint saved inside an epoch resumes from that epoch's start")
def test_a_version_2_checkpoint_resumes(tmp_path):
    straight = _run(tmp_path / "straight", epochs=2)
    _run(tmp_path / "end", epochs=2, max_steps=6)
    _as_version_2(tmp_path / "end" / "checkpoint.pt")
    _assert_same_run(_run(tmp_path / "end", resume=True, epochs=2), straight, tmp_path / "end", tmp_path / "straight")
    _run(tmp_path / "inside", epochs=2, max_steps=8)  # 2 steps into epoch 2
    _as_version_2(tmp_path / "inside" / "checkpoint.pt")
    assert load_checkpoint(tmp_path / "inside" / "checkpoint.pt")["state"]["epoch_step"] == 0
    resumed = _run(tmp_path / "inside", resume=True, epochs=2)
    assert [row["epoch"] for row in resumed["epochs"]] == [1, 2] and resumed["epochs"][1]["steps"] == 14


@faults("a checkpoint of a version this pyrovae does not know")
def test_an_unknown_checkpoint_version_is_refused_with_what_to_do(tmp_path):
    _run(tmp_path / "run", epochs=1)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    state["version"] = 99
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="version 99.*reads versions 1 to 3.*train it afresh"):
        load_checkpoint(tmp_path / "run" / "checkpoint.pt")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@faults("SIGINT mid-run: checkpoint, resume hint, exit 130",
        "SIGTERM mid-run: checkpoint, resume hint, exit 143, exact resume")
def test_signal_checkpoints_and_resume_matches_the_straight_run(tmp_path, signum, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # decoded image folders are cached there
    folder = image_folder(tmp_path / "images")
    args = ["--z-dim", "4", "--hidden", "32", "--batch-size", "100", "--dataset", f"folder:{folder}", "--quiet"]
    out = tmp_path / "run"
    proc = _cli_run([*args, "--epochs", "50", "--checkpoint-every", "2", "--out", str(out)], dict(os.environ))
    _wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Resume with: pyrovae train --resume" in err and "Traceback" not in err
    state = load_checkpoint(out / "checkpoint.pt")["state"]
    assert 2 <= state["step"] < 300
    assert not (out / LOCK_NAME).exists()  # the folder is free again
    if signum == signal.SIGINT:
        return  # the exact resume is proved once, after SIGTERM
    epochs = state["epoch"] + 1
    assert main(["train", "--resume", str(out), "--epochs", str(epochs), "--quiet"]) == 0
    straight = tmp_path / "straight"
    assert main(["train", *args, "--epochs", str(epochs), "--out", str(straight)]) == 0
    a, b = _params(out / "checkpoint.pt"), _params(straight / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (out, straight))
    assert _rows(ma) == _rows(mb)


@faults("SIGKILL in the middle of writing a checkpoint: the previous checkpoint still loads")
def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path):
    path = tmp_path / "checkpoint.pt"
    script = f"""
import torch
from pyrovae.atomic import StorageError
from pyrovae import Config, build_vae
from pyrovae.checkpoint import save_checkpoint
vae = build_vae(Config().model)
opt = torch.optim.Adam(vae.parameters())
big = {{"ballast": torch.randn(10_000_000)}}   # ~40 MB: a write takes a while
save_checkpoint({str(path)!r}, vae=vae, optimizer=opt, config=Config(), state={{"epoch": 0}})
print("ready", flush=True)
epoch = 1
while True:
    save_checkpoint({str(path)!r}, vae=vae, optimizer=opt, config=Config(), state={{"epoch": epoch, **big}})
    epoch += 1
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.7)  # inside the second or a later write
    proc.kill()
    proc.wait()
    proc.stdout.close()
    state = load_checkpoint(path)  # loads: the old or a complete new checkpoint, never a torn one
    assert state["state"]["epoch"] >= 0
    vae, _, _ = load_vae(path)
    assert sum(p.numel() for p in vae.parameters()) > 0


# --- numerics ------------------------------------------------------------------------------------
class _NaNAt(torch.nn.Module):
    """A loss that turns NaN at a chosen call."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x, kl_weight=1.0):
        self.calls += 1
        loss = self.inner(x, kl_weight=kl_weight)
        return loss * float("nan") if self.calls == self.at else loss


@faults("a NaN loss: stops, names epoch and step, keeps the last good checkpoint")
def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import pyrovae.runs as runs

    real = runs.build_objective
    monkeypatch.setattr(runs, "build_objective", lambda name, vae, particles, *args, **kwargs: _NaNAt(
        real(name, vae, particles, *args, **kwargs), at=8))
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at epoch 2, step 2 of the epoch.*\(epoch 1, step 6\)"):
        _run(tmp_path / "run", epochs=3)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["state"]["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


class _InfiniteGradient(torch.nn.Module):
    """A finite loss whose gradient is infinite: d/dw sqrt(|w - w|) at 0."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, kl_weight=1.0):
        w = self.vae.decoder.net[0].weight
        return (w - w.detach()).abs().sqrt().sum()


@faults("an infinite gradient with a finite loss: stops and names the parameter",
        "a non-finite value before any checkpoint: says that none was written")
def test_non_finite_gradient_names_the_parameter_and_no_update_is_applied():
    vae = build_vae(TINY.model)
    opt = make_optimizer(vae.parameters(), 1e-3, torch.device("cpu"))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"gradient of vae.decoder.net.0.weight is not finite at epoch 1, "
                                                  r"step 1 of the epoch.*No checkpoint had been written yet"):
        fit(TINY.replace(train={"epochs": 1}), vae, _InfiniteGradient(vae), opt, DATA, quiet=True)
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())  # no update was applied


@faults("gradient clipping from the config bounds the gradient norm")
def test_gradient_clipping_bounds_the_gradient_norm():
    from pyrovae.objectives import PyroELBO

    vae = build_vae(ModelConfig(z_dim=2, hidden=(8,)))
    opt = make_optimizer(vae.parameters(), 1e-3, torch.device("cpu"))
    train_step(PyroELBO(vae), opt, binary_images(16), grad_clip=0.5)
    norm = torch.nn.utils.get_total_norm([p.grad for p in vae.parameters()])
    assert norm <= 0.5 + 1e-5


# --- bad input: each a clear error ---------------------------------------------------------------
def _grey_to_bernoulli():
    build_vae(ModelConfig(z_dim=2, hidden=(8,))).model(torch.rand(2, 1, 28, 28))


def _wrong_shape():
    build_vae(ModelConfig(z_dim=2, hidden=(8,))).model(torch.zeros(2, 3, 32, 32))


BAD_INPUTS = [
    (case("grey levels given to the Bernoulli likelihood"), _grey_to_bernoulli, DataSupportError, "Binarize"),
    (case("images of the wrong shape for the network"), _wrong_shape, ImageShapeError, "expected a batch of images"),
    (case("an unknown prior name"), lambda: check_names(Config().replace(model={"prior": "cauchy"})), ConfigError, "valid: "),
    (case("an unknown likelihood name"), lambda: check_names(Config().replace(model={"likelihood": "x"})), ConfigError, "valid: "),
    (case("an unknown posterior name"), lambda: check_names(Config().replace(model={"posterior": "x"})), ConfigError, "valid: "),
    (case("a config written with the old key model.guide"), lambda: Config.from_dict({"model": {"guide": "iaf"}}),
     ConfigError, "model.guide is now model.posterior"),
    (case("an unknown network name"), lambda: check_names(Config().replace(model={"network": "x"})), ConfigError, "valid: auto"),
    (case("a zero learning rate"), lambda: Config().replace(train={"lr": 0.0}), ConfigError, "train.lr"),
    (case("a negative learning rate"), lambda: Config().replace(train={"lr": -1e-3}), ConfigError, "train.lr"),
    (case("a zero batch size"), lambda: Config().replace(train={"batch_size": 0}), ConfigError, "batch_size"),
    (case("a zero latent size"), lambda: Config().replace(model={"z_dim": 0}), ConfigError, "z_dim"),
    (case("fewer than one importance sample (K < 1)"), lambda: Config().replace(train={"particles": 0}), ConfigError,
     "train.particles"),
    (case("a negative gradient clip"), lambda: Config().replace(train={"grad_clip": -1.0}), ConfigError, "grad_clip"),
    (case("an unknown config key"), lambda: Config.from_dict({"train": {"epoch": 3}}), ConfigError, "valid: epochs"),
    (case("a malformed --set override"), lambda: Config.load(ROOT / "pyproject.toml", ["lr=3"]), ConfigError,
     "section.key=value"),
]


@pytest.mark.parametrize("name,fn,error,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_clearly(name, fn, error, needle):
    with pytest.raises(error, match=needle):
        fn()


@faults("a missing, malformed or wrong config file")
def test_config_files_missing_broken_or_wrong(tmp_path):
    with pytest.raises(ConfigError, match="no config file at"):
        Config.load(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[model\nz_dim = 2")
    with pytest.raises(ConfigError, match="not a valid TOML file"):
        Config.load(tmp_path / "bad.toml")
    (tmp_path / "wrong.toml").write_text("[model]\nzdim = 2\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['zdim'\]"):
        Config.load(tmp_path / "wrong.toml")


@faults("a missing dataset with downloading off",
        "truncated dataset files")
def test_missing_and_unreadable_datasets(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="MNIST was not found"):
        load_mnist(tmp_path / "empty", train=True, download=False)
    raw = tmp_path / "bad" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in MNIST_FILES:
        (raw / f).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 100)
    with pytest.raises(DatasetNotFoundError, match="could not be read.*truncated or corrupt"):
        load_mnist(tmp_path / "bad", train=False, download=False)


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "foreign", "incompatible", "missing"])
@faults("a empty checkpoint",
        "a garbage checkpoint",
        "a truncated checkpoint",
        "a foreign checkpoint",
        "a incompatible checkpoint",
        "a missing checkpoint")
def test_bad_checkpoints(tmp_path, kind):
    path = tmp_path / "checkpoint.pt"
    vae = build_vae(ModelConfig(z_dim=2, hidden=(8,)))
    save_checkpoint(path, vae=vae, optimizer=None, config=Config().replace(model={"z_dim": 2, "hidden": (8,)}),
                    state={"epoch": 1})
    good = path.read_bytes()
    needle = {"empty": "could not be read", "garbage": "could not be read", "truncated": "could not be read",
              "foreign": "not a pyrovae checkpoint", "incompatible": "do not fit the saved config",
              "missing": "no checkpoint at"}[kind]
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "foreign":
        torch.save({"state_dict": vae.state_dict()}, path)
    elif kind == "incompatible":
        state = torch.load(path, weights_only=True)
        state["config"]["model"]["z_dim"] = 3
        torch.save(state, path)
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=needle):
        load_vae(path)


@faults("a checkpoint holding an arbitrary pickled object is refused")
def test_checkpoints_load_without_unpickling_objects(tmp_path):
    path = tmp_path / "checkpoint.pt"
    import argparse

    torch.save({"format": "pyrovae-checkpoint", "version": 1, "payload": argparse.Namespace(x=1)}, path)
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(path)


@faults("an output folder that already holds a run")
def test_output_folder_with_another_run_is_refused(tmp_path):
    _run(tmp_path / "run", epochs=1)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(RunFolderError, match="--overwrite"):
        _run(tmp_path / "run", epochs=1, lr=0.01)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


@faults("resuming with a different config",
        "resuming a folder with no run",
        "--resume with flags that would change the run")
def test_resume_refuses_a_changed_config_or_a_missing_run(tmp_path, capsys):
    _run(tmp_path / "run", epochs=1)
    with pytest.raises(CheckpointError, match=r"train.lr: saved 0.001, given 0.01"):
        _run(tmp_path / "run", resume=True, epochs=2, lr=0.01)
    assert main(["train", "--resume", str(tmp_path / "none"), "--epochs", "2"]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(tmp_path / "run"), "--lr", "0.1"])
    assert "only --epochs, --max-steps, --max-seconds and --data-dir" in capsys.readouterr().err



# --- every mistake a clear message, before anything is loaded or written -------------------------
#: Downloads fail at once: every request goes to a proxy on a closed local port.
NO_NETWORK = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def _cli(*args, cwd=ROOT, env=None, timeout=300):
    """``python -m pyrovae ARGS`` as a real subprocess: (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, "-m", "pyrovae", *args], capture_output=True, text=True, cwd=cwd,
                            env={**os.environ, **(env or {})}, timeout=timeout)
    return result.returncode, result.stdout, result.stderr


BAD_VALUES = [  # (flags, what the message must say); each is refused before the data are read
    (["--prior", "vamp", "--set", "model.prior_options.components=0"], "at least one pseudo-input, got components=0"),
    (["--prior", "vamp", "--set", "model.prior_options.components=abc"],
     "model.prior_options.components must be an integer, got 'abc'"),
    (["--posterior", "iaf", "--set", "model.posterior_options.flows=0"], "at least one flow, got flows=0"),
    (["--likelihood", "normal", "--set", "model.likelihood_options.scale=bogus"],
     "unknown scale 'bogus' for the normal likelihood; valid: fixed, learned, per_pixel"),
    (["--set", "model.hidden=[400, -1]"], "model.hidden must be one or more positive layer widths"),
    (["--set", "train.seed=-1"], "train.seed must be an integer from 0"),
    (["--set", "train.batch_size=abc"], "train.batch_size must be a positive integer, got 'abc'"),
    (["--set", "train.tensorboard=maybe"], "train.tensorboard must be true or false"),
    (["--network", "conv", "--set", "model.network_options.channels=[8, 8, 8, 8, 8, 8]"],
     "model.network 'conv'"),
    (["--plugin", "no_such_plugin_module"], "no plugin module 'no_such_plugin_module'"),
]
for flags, _ in BAD_VALUES:
    case(f"a bad option value ({' '.join(flags)}): one message before the data are read, no folder left")


@pytest.mark.parametrize("flags,needle", BAD_VALUES, ids=[" ".join(f) for f, _ in BAD_VALUES])
def test_bad_values_are_one_message_before_any_data_and_leave_nothing(tmp_path, flags, needle):
    out = tmp_path / "run"
    code, _, err = _cli("train", "--out", str(out), "--data-dir", str(tmp_path / "no-data-here"), *flags)
    assert code in (1, 2) and "Traceback" not in err, err
    assert needle in err, err
    assert "no-data-here" not in err  # the value was refused first: the missing data were never looked for
    assert not out.exists()


CLI_MISTAKES = [  # (arguments, with {images} and {tmp} filled in; what stderr must say)
    (["train", "--out", "{tmp}/file/run", "--dataset", "folder:{images}"], "a part of the path is a file"),
    (["train", "--out", "{tmp}/file", "--dataset", "folder:{images}"], "is a file, not a folder"),
    (["train", "--out", "{tmp}/run", "--dataset", "folder:{images}", "--lr", "1e5", "--batch-size", "20"],
     "No checkpoint had been written yet"),
    (["train", "--resume", "{tmp}/nothing-here"], "no checkpoint at"),
    (["train", "--config", "{tmp}/missing.toml"], "no config file at"),
    (["train", "--set", "train.epochs"], "an override must look like section.key=value"),
    (["train", "--dataset", "folder:{tmp}/no-such-folder", "--out", "{tmp}/run"], "no-such-folder"),
    (["evaluate", "{tmp}/file"], "could not be read as a pyrovae checkpoint"),
    (["sample", "{tmp}/nothing-here", "--out", "{tmp}/s"], "no checkpoint at"),
]
for args, _ in CLI_MISTAKES:
    case(f"command line: pyrovae {' '.join(args)}")


@pytest.mark.parametrize("args,needle", CLI_MISTAKES, ids=[" ".join(a) for a, _ in CLI_MISTAKES])
def test_command_line_mistakes_end_in_one_message_not_a_traceback(tmp_path, args, needle):
    (tmp_path / "file").write_text("not a checkpoint")
    images = image_folder(tmp_path / "images", 60, 20)
    code, _, err = _cli(*[a.format(tmp=tmp_path, images=images) for a in args])
    assert code in (1, 2) and "Traceback" not in err, err
    assert needle in err, err


@faults("a run that fails to start (data missing) leaves nothing that blocks the corrected retry",
        "--data-dir naming a folder that does not exist: one message, and no folder is made there")
def test_a_run_that_cannot_start_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "run"
    code, _, err = _cli("train", "--out", str(out), "--data-dir", str(tmp_path / "no-data-here" / "mnist"),
                        "--max-steps", "2", "--train-subset", "256", "--test-subset", "256", "--batch-size", "64",
                        env=NO_NETWORK)
    assert code == 1 and "Traceback" not in err and "no-data-here" in err and "MNIST was not found" in err, err
    assert not out.exists() and not (tmp_path / "no-data-here").exists()


@faults("--overwrite over a finished 2-D run: nothing of the old run survives (evaluation, manifold, scatter)",
        "--overwrite refuses a folder that holds files a run does not write")
def test_overwrite_replaces_the_whole_run(tmp_path):
    out = tmp_path / "run"
    train_run(TINY.replace(model={"z_dim": 2}, train={"epochs": 1}), out, data=DATA, quiet=True)
    (out / "evaluation.json").write_text("{}")
    old = {p.name for p in out.iterdir()}
    assert {"manifold.png", "latent_scatter.png", "evaluation.json"} <= old
    train_run(TINY.replace(train={"epochs": 1}), out, data=DATA, quiet=True, overwrite=True)
    new = {p.name for p in out.iterdir()}
    assert not {"manifold.png", "latent_scatter.png", "evaluation.json"} & new
    assert json.loads((out / "config.json").read_text())["model"]["z_dim"] == TINY.model.z_dim
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="notes.txt"):
        train_run(TINY.replace(train={"epochs": 1}), out, data=DATA, quiet=True, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint.pt").exists()


def _fail_fsync(code):
    def fsync(fd):
        raise OSError(code, os.strerror(code))
    return fsync


@pytest.mark.parametrize("code,advice", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "permission denied")])
@faults("disk full while writing a checkpoint: one message naming the file, the previous checkpoint intact",
        "read-only file system while writing a checkpoint",
        "permission denied while writing a checkpoint")
def test_a_failed_checkpoint_write_is_a_message_and_keeps_the_previous_one(tmp_path, monkeypatch, code, advice):
    out = tmp_path / "run"
    _run(out, epochs=1)
    before = (out / "checkpoint.pt").read_bytes()
    monkeypatch.setattr("pyrovae.atomic.os.fsync", _fail_fsync(code))
    with pytest.raises(StorageError, match=f"cannot write {re.escape(str(out / 'checkpoint.pt'))}: .*{advice}"):
        _run(out, resume=True, epochs=2)
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob(".*.tmp"))


@faults("--out under a file: one message, no traceback", "sample --out under a file: one message")
def test_an_output_path_under_a_file_is_one_message(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["train", "--out", str(tmp_path / "file" / "run"), "--max-steps", "1", "--quiet",
                 "--dataset", f"folder:{image_folder(tmp_path / 'images', 60, 20)}"]) == 1
    err = capsys.readouterr().err
    assert "a part of the path is a file" in err and "Traceback" not in err
    _run(tmp_path / "run", epochs=1)
    assert main(["sample", str(tmp_path / "run"), "--out", str(tmp_path / "file" / "samples")]) == 1
    assert "a part of the path is a file" in capsys.readouterr().err


@faults("a stray temporary file of a killed write is removed on resume")
def test_stray_temporaries_are_removed_on_resume(tmp_path):
    out = tmp_path / "run"
    _run(out, epochs=1)
    stray = out / ".checkpoint.pt.k1ll3d.tmp"
    stray.write_bytes(b"partial")
    _run(out, resume=True, epochs=2)
    assert not stray.exists()


@faults("a step budget inside an epoch prints and records the training loss so far")
def test_a_stop_inside_an_epoch_reports_the_loss_so_far(tmp_path):
    lines = []
    metrics = train_run(TINY.replace(train={"max_steps": 3}), tmp_path / "run", data=DATA, log=lines.append).metrics
    partial = metrics["partial_epoch"]
    assert partial["epoch"] == 1 and partial["steps"] == 3 and partial["images"] == 300
    assert 0 < partial["train_neg_elbo"] < 1000
    assert any("stopped in epoch 1 after 3 of its 6 steps" in line for line in lines)


@faults("a batch larger than the dataset says it trains full-batch")
def test_a_batch_larger_than_the_data_is_said(tmp_path):
    lines = []
    train_run(TINY.replace(train={"batch_size": 1000, "max_steps": 1}), tmp_path / "run", data=DATA, log=lines.append)
    assert any("larger than the 600 training images" in line for line in lines)


@faults("a folder of grey images with one colour image says it reads them all as RGB")
def test_a_folder_mixing_colour_and_grey_says_so(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from pyrovae.data import load_image_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = image_folder(tmp_path / "images", 30, 10)
    Image.new("RGB", (28, 28), (200, 10, 10)).save(folder / "train" / "class0" / "odd.png")
    images = load_image_folder(folder / "train").images
    assert images.shape[1] == 3
    err = capsys.readouterr().err
    assert "1 of the 31 images" in err and "odd.png" in err and "30 grey" in err


@faults("files get the usual mode (0666 less the umask), not 0600")
def test_files_are_written_with_the_usual_mode(tmp_path):
    _run(tmp_path / "run", epochs=1)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("config.json", "metrics.json", "checkpoint.pt", "samples.png"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o666 & ~mask, name


@faults("resume with other data than the run was trained on is refused")
def test_resume_refuses_other_data(tmp_path):
    _run(tmp_path / "run", epochs=1)
    other = synthetic_data(n_train=600, n_test=100, seed=5)
    with pytest.raises(CheckpointError, match="not the data it was trained on.*different contents"):
        train_run(TINY.replace(train={"epochs": 2}), tmp_path / "run", data=other, quiet=True, resume=True)
    smaller = synthetic_data(n_train=500, n_test=100)
    with pytest.raises(CheckpointError, match=r"train_shape: trained on \[600, 1, 28, 28\], found \[500"):
        train_run(TINY.replace(train={"epochs": 2}), tmp_path / "run", data=smaller, quiet=True, resume=True)


@pytest.mark.mnist
@faults("resume after the data moved: --data-dir says where they are now")
def test_resume_accepts_data_dir_for_moved_data(tmp_path, mnist_root):
    first = tmp_path / "first"
    shutil.copytree(mnist_root / "MNIST", first / "MNIST")
    args = ["--z-dim", "2", "--hidden", "16", "--train-subset", "300", "--test-subset", "100", "--batch-size", "100",
            "--quiet"]
    assert main(["train", "--out", str(tmp_path / "run"), "--data-dir", str(first), "--max-steps", "2", *args]) == 0
    moved = tmp_path / "moved"
    first.rename(moved)
    assert main(["train", "--resume", str(tmp_path / "run"), "--data-dir", str(moved), "--epochs", "1",
                 "--quiet"]) == 0
    assert load_checkpoint(tmp_path / "run")["state"]["epoch"] == 1


PLUGIN = """
import torch
import pyro.distributions as dist
from torch import nn

from pyrovae.priors import PRIORS, Prior


class LogisticPrior(Prior):
    def __init__(self, z_dim: int, scale: float = 1.0):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"the logistic prior needs a positive scale, got scale={scale}")
        self.z_dim, self.scale = z_dim, scale
        self.register_buffer("zero", torch.zeros(z_dim))

    def forward(self):
        base = dist.Uniform(torch.zeros_like(self.zero), torch.ones_like(self.zero))
        logistic = dist.TransformedDistribution(base, [dist.transforms.SigmoidTransform().inv,
                                                       dist.transforms.AffineTransform(0.0, self.scale)])
        return logistic.to_event(1)


PRIORS[{name!r}] = LogisticPrior
"""


@faults("a prior from a plugin module (--plugin) trains, and its run is sampled from the CLI",
        "a prior from an installed entry point (group pyrovae.priors) trains by name")
def test_plugins_reach_the_command_line_and_saved_runs(tmp_path):
    images = image_folder(tmp_path / "images", 60, 20)
    common = ["--dataset", f"folder:{images}", "--z-dim", "2", "--hidden", "16", "--max-steps", "2", "--quiet"]
    (tmp_path / "my_priors.py").write_text(PLUGIN.replace("{name!r}", "'logistic'"))
    code, _, err = _cli("train", "--plugin", "my_priors", "--prior", "logistic", "--out", str(tmp_path / "a"),
                        *common, cwd=tmp_path)
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model"]["plugins"] == ["my_priors"]
    code, out, err = _cli("sample", str(tmp_path / "a"), "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert code == 0 and "samples.png" in out, err

    site = tmp_path / "site"  # an installed distribution: a module and its dist-info with entry points
    (site / "pyrovae_logistic-0.1.dist-info").mkdir(parents=True)
    (site / "pyrovae_logistic-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: pyrovae-logistic\nVersion: 0.1\n")
    (site / "pyrovae_logistic-0.1.dist-info" / "entry_points.txt").write_text(
        "[pyrovae.priors]\nlogistic_ep = pyrovae_logistic:LogisticPrior\n")
    (site / "pyrovae_logistic.py").write_text(PLUGIN.replace("PRIORS[{name!r}] = LogisticPrior", ""))
    env = {"PYTHONPATH": str(site)}
    code, _, err = _cli("train", "--prior", "logistic_ep", "--out", str(tmp_path / "b"), *common, env=env)
    assert code == 0, err
    code, _, err = _cli("train", "--prior", "logistic_ep", "--set", "model.prior_options.scale=-1",
                        "--out", str(tmp_path / "c"), *common, env=env)
    assert code == 2 and "positive scale, got scale=-1" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


@faults("a run trained with train.tensorboard loads where the tensorboard package is missing",
        "train.tensorboard without the tensorboard package is refused before the run starts")
def test_tensorboard_is_checked_where_it_is_used_not_in_the_config(tmp_path, monkeypatch):
    _run(tmp_path / "run", max_steps=2)
    path = tmp_path / "run" / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    saved["config"]["train"]["tensorboard"] = True  # as if trained with --tensorboard on another machine
    torch.save(saved, path)
    monkeypatch.setattr("pyrovae.board.tensorboard_available", lambda: False)
    vae, config, _ = load_vae(path)
    assert config.train.tensorboard and vae.sample(2).shape[0] == 2
    with pytest.raises(ConfigError, match="train.tensorboard needs the tensorboard package"):
        train_run(TINY.replace(train={"tensorboard": True}), tmp_path / "new", data=DATA, quiet=True)
    assert not (tmp_path / "new" / "config.json").exists()


@faults("a saved run naming a plugin that is not installed here: evaluate and sample say so in one line")
def test_a_run_whose_plugin_is_missing_here_is_one_message(tmp_path, capsys):
    _run(tmp_path / "run", max_steps=2)
    path = tmp_path / "run" / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    saved["config"]["model"]["plugins"] = ["no_such_plugin_module"]  # as if trained where the plugin was installed
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="cannot build: model.plugins: no plugin module 'no_such_plugin_module'"):
        load_vae(path)
    assert main(["sample", str(tmp_path / "run"), "--out", str(tmp_path / "s")]) == 1
    assert "no plugin module 'no_such_plugin_module'" in capsys.readouterr().err


@faults("a run naming a part, plugin or objective that does not exist here is refused before its folder is made")
def test_names_are_resolved_before_the_run_folder_is_claimed(tmp_path):
    for model, train, needle in [({"prior": "cauchy"}, {}, "unknown model.prior 'cauchy'"),
                                 ({"plugins": ("no_such_plugin_module",)}, {}, "no plugin module"),
                                 ({}, {"objective": "elbo2"}, "unknown objective 'elbo2'")]:
        with pytest.raises(ConfigError, match=needle):
            train_run(TINY.replace(model=model, train=train), tmp_path / "new", data=DATA, quiet=True)
        assert not (tmp_path / "new").exists()


@faults("train_run leaves Pyro's global parameter store as it was")
def test_training_leaves_the_param_store_empty(tmp_path):
    pyro.clear_param_store()
    run = _run(tmp_path / "run", epochs=1)
    assert len(pyro.get_param_store()) == 0 and run["epochs"]


# --- one writer per folder, checked before any work, nothing half-made -----------------------------
READ_ONLY_SITE = '''"""Imported at start-up: every write under $PYROVAE_TEST_READ_ONLY fails as on a read-only file system."""
import builtins, errno, io, os

_FOLDER = os.path.abspath(os.environ["PYROVAE_TEST_READ_ONLY"])


def _inside(*paths):
    for path in paths:
        try:
            path = os.path.abspath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            continue
        if path == _FOLDER or path.startswith(_FOLDER + os.sep):
            return True
    return False


def _guard(fn, paths=1, writes=lambda *args, **kwargs: True):
    def guarded(*args, **kwargs):
        if _inside(*args[:paths]) and writes(*args[paths:], **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(args[0]))
        return fn(*args, **kwargs)
    return guarded


os.open = _guard(os.open, writes=lambda flags, *args, **kwargs: flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
builtins.open = io.open = _guard(builtins.open, writes=lambda mode="r", *args, **kwargs: any(c in mode for c in "wax+"))
for _name in ("mkdir", "rmdir", "remove", "unlink"):
    setattr(os, _name, _guard(getattr(os, _name)))
for _name in ("rename", "replace", "link"):
    setattr(os, _name, _guard(getattr(os, _name), paths=2))
'''


@contextlib.contextmanager
def _read_only(folder, tmp_path):
    """The environment of a subprocess that finds ``folder`` read-only: made so by its mode, or, where the
    tests run as root (whom modes do not stop), by a sitecustomize that refuses every write under it as a
    read-only file system does."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield {}
        finally:
            folder.chmod(0o755)
        return
    site = tmp_path / "read-only-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(READ_ONLY_SITE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    yield {"PYTHONPATH": path, "PYROVAE_TEST_READ_ONLY": str(folder)}


def _folder_args(tmp_path, batch=20):
    """Flags for a tiny run on 60 synthetic training images (``60 / batch`` steps an epoch)."""
    images = image_folder(tmp_path / "images", 60, 20)
    return ["--dataset", f"folder:{images}", "--z-dim", "3", "--hidden", "16", "--batch-size", str(batch), "--quiet"]


def _lock_holder(folder, procs, timeout=120):
    """What the lock one of ``procs`` took on ``folder`` says, once it is there and filled in."""
    start = time.time()
    while time.time() - start < timeout and any(p.poll() is None for p in procs):
        try:
            return json.loads((folder / LOCK_NAME).read_text())
        except (OSError, ValueError):
            time.sleep(0.02)
    raise AssertionError(f"no lock in {folder}: {[p.poll() for p in procs]}")


@faults("two commands writing into one folder: the second is refused, naming the first's pid and start time, "
        "and the first's run is the run it makes alone")
def test_a_second_writer_is_refused_and_the_first_runs_as_if_alone(tmp_path):
    args = [*_folder_args(tmp_path), "--epochs", "1"]
    twin, alone = tmp_path / "twin", tmp_path / "alone"
    procs = [_cli_run([*args, "--out", str(twin)], dict(os.environ))]
    time.sleep(0.3)
    procs.append(_cli_run([*args, "--out", str(twin)], dict(os.environ)))
    holder = _lock_holder(twin, procs)
    first, second = sorted(procs, key=lambda p: p.pid != holder["pid"])  # the one holding the lock is first
    first.send_signal(signal.SIGSTOP)  # it holds the folder (and stays there) while the other one tries
    try:
        _, err = second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=120)
    assert holder["pid"] == first.pid and first.returncode == 0, first_err
    assert second.returncode == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"in use by another pyrovae command: pid {first.pid}" in err and f"started {holder['started']}" in err
    assert not (twin / LOCK_NAME).exists()
    assert main(["train", *args, "--out", str(alone)]) == 0
    a, b = (json.loads((folder / "metrics.json").read_text()) for folder in (twin, alone))
    assert _rows(a) == _rows(b) and a["config"] == b["config"] and a["data"] == b["data"]
    pa, pb = _params(twin / "checkpoint.pt"), _params(alone / "checkpoint.pt")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert sorted(p.name for p in twin.iterdir()) == sorted(p.name for p in alone.iterdir())


@faults("a lock left by a process that no longer runs on this host is taken over, with a note",
        "two runs started in the same second without --out get two folders")
def test_a_stale_lock_is_taken_over_and_new_folders_are_unique(tmp_path, monkeypatch, capsys):
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    out = tmp_path / "run"
    out.mkdir()
    stale = {"pid": gone, "host": socket.gethostname(), "started": "2020-01-02 03:04:05", "command": "pyrovae train"}
    (out / LOCK_NAME).write_text(json.dumps(stale))
    lines = []
    train_run(TINY.replace(train={"max_steps": 1}), out, data=DATA, log=lines.append)
    assert any(f"locked by pid {gone} (started 2020-01-02 03:04:05), which no longer runs" in line for line in lines)
    assert (out / "checkpoint.pt").is_file() and not (out / LOCK_NAME).exists()
    held = tmp_path / "held"
    held.mkdir()
    (held / LOCK_NAME).write_text(json.dumps({**stale, "pid": os.getppid()}))  # a process that runs
    with pytest.raises(FolderInUseError, match=f"pid {os.getppid()} on .* started 2020-01-02 03:04:05"):
        _run(held, epochs=1)
    assert sorted(p.name for p in held.iterdir()) == [LOCK_NAME]

    import pyrovae.cli as cli
    from datetime import datetime

    class SameSecond(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2024, 5, 6, 7, 8, 9)

    monkeypatch.setattr(cli, "datetime", SameSecond)
    monkeypatch.chdir(tmp_path)
    args = [*_folder_args(tmp_path), "--max-steps", "1"]
    assert main(["train", *args]) == 0 and main(["train", *args]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["folder-20240506-070809",
                                                                      "folder-20240506-070809-2"]
    assert "outputs in runs/folder-20240506-070809-2" in capsys.readouterr().out


@faults("evaluate --particles on a read-only run folder: one message, before any data are read",
        "evaluate --out under a file: one message, before any data are read")
def test_evaluate_checks_where_it_writes_before_any_work(tmp_path, monkeypatch, capsys):
    run, nowhere = tmp_path / "run", tmp_path / "no-data"
    _run(run, epochs=1)  # its data (MNIST by the config) are not in --data-dir: reading them would fail
    with _read_only(run, tmp_path) as env:
        code, _, err = _cli("evaluate", str(run), "--particles", "1000", "--data-dir", str(nowhere),
                            env={**env, **NO_NETWORK})
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"cannot write {run}" in err and "MNIST" not in err
    assert sorted(p.name for p in run.iterdir()) == sorted(["config.json", "metrics.json", "checkpoint.pt",
                                                              *(p.name for p in run.glob("*.png"))])
    (tmp_path / "file").write_text("x")
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    assert main(["evaluate", str(run), "--out", str(tmp_path / "file" / "evaluation.json"),
                 "--data-dir", str(nowhere)]) == 1
    err = capsys.readouterr().err
    assert "a part of the path is a file" in err and "MNIST" not in err, err


@faults("evaluate prints its figures first: a write that fails after the work says they are printed above")
def test_evaluate_prints_before_it_writes(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["train", *_folder_args(tmp_path), "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()

    def full(path, obj):
        raise StorageError(errno.ENOSPC, f"cannot write {path}: No space left on device; the disk is full")
    monkeypatch.setattr("pyrovae.runs.write_json", full)
    assert main(["evaluate", str(run)]) == 1
    out, err = capsys.readouterr()
    assert "test -ELBO" in out and "the disk is full. The figures are printed above" in err
    assert not (run / LOCK_NAME).exists()


@faults("train --resume on a read-only run folder: one message, before any data are read or a step taken")
def test_resume_on_a_read_only_folder_fails_at_once(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _run(run, epochs=1)
    before = (run / "checkpoint.pt").read_bytes()
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    if os.geteuid() == 0:  # root writes whatever the modes say: refuse the writes as a read-only file system
        real_open = os.open

        def read_only_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and Path(os.fsdecode(path)).is_relative_to(run):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
            return real_open(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", read_only_open)
    else:
        run.chmod(0o555)
    try:
        code = main(["train", "--resume", str(run), "--epochs", "2", "--data-dir", str(tmp_path / "no-data")])
    finally:
        run.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"cannot write {run}" in err and "MNIST" not in err
    assert (run / "checkpoint.pt").read_bytes() == before


@faults("a run that diverges before its first checkpoint leaves no folder, and the corrected command then runs",
        "a folder holding only the config.json of a run that never saved is taken by a new run, with a note",
        "--resume of a folder whose run never saved says there is no checkpoint")
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, capsys):
    args = _folder_args(tmp_path)
    out = tmp_path / "run"
    code, _, err = _cli("train", *args, "--out", str(out), "--lr", "1e30", "--max-steps", "2")
    assert code == 1 and "No checkpoint had been written yet" in err and "Traceback" not in err, err
    assert not out.exists()
    assert main(["train", *args, "--out", str(out), "--max-steps", "2"]) == 0
    old = tmp_path / "old"  # as a run that never saved leaves it (older versions did)
    old.mkdir()
    shutil.copy(out / "config.json", old / "config.json")
    capsys.readouterr()
    assert main(["train", "--resume", str(old)]) == 1
    err = capsys.readouterr().err
    assert f"no checkpoint in {old}" in err and "--resume it" not in err
    assert main(["train", *args, "--out", str(old), "--max-steps", "2"]) == 0
    assert "never saved a checkpoint" in capsys.readouterr().out and (old / "checkpoint.pt").is_file()


@faults("train --resume RUN/checkpoint.pt resumes the run, as the run folder does",
        "--quiet with a step budget inside the first epoch still prints where the outputs went",
        "a resume with nothing left to do says so")
def test_resume_takes_the_checkpoint_file_and_quiet_says_where(tmp_path, capsys):
    args = _folder_args(tmp_path, batch=10)  # 6 steps an epoch
    run = tmp_path / "run"
    assert main(["train", *args, "--out", str(run), "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out == f"stopped after 2 steps, before the first epoch ended (no test figures yet); outputs in {run}\n"
    code, out, err = _cli("train", "--resume", str(run / "checkpoint.pt"), "--max-steps", "2")
    assert code == 0 and "Traceback" not in err, err
    assert out.splitlines() == [f"nothing to do: {run} has taken 2 steps, and --max-steps counts all steps (2); "
                                "give a larger --max-steps to train it further"]
    assert main(["train", "--resume", str(run / "checkpoint.pt"), "--max-steps", "3", "--quiet"]) == 0
    assert load_checkpoint(run)["state"]["step"] == 3 and f"outputs in {run}" in capsys.readouterr().out


@faults("a resume whose config.json was edited by hand is refused, naming the fields that differ")
def test_resume_refuses_an_edited_config_json(tmp_path):
    run = tmp_path / "run"
    _run(run, epochs=1)
    config = json.loads((run / "config.json").read_text())
    config["model"]["z_dim"], config["train"]["lr"] = 8, 0.01
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = _cli("train", "--resume", str(run), "--epochs", "2", env=NO_NETWORK)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "model.z_dim: checkpoint 4, config.json 8" in err and "train.lr: checkpoint 0.001, config.json 0.01" in err
    assert "Undo the edit to config.json, or start a new run" in err


@faults("Ctrl-C while the command starts (torch loading): exit 130 and one line, no traceback")
@pytest.mark.parametrize("delay", [0.2, 0.3, 0.45, 0.7, 1.0])
def test_ctrl_c_during_start_up_is_one_line(tmp_path, delay):
    """Past the interpreter's own start (0.1 s), at several moments of loading torch, Pyro and
    torchvision (a second or more). Raised inside torch's C++ start-up, an interrupt used to abort
    the process (SIGABRT) or leave numpy half-loaded, now and then, depending on where it landed."""
    proc = _cli_run(["--out", str(tmp_path / "run"), "--max-steps", "2"], dict(os.environ))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@faults("a Ctrl-C caught after it left code run from a string (a dataclass being built) still exits 130")
@pytest.mark.parametrize("where", ["command", "start-up"])
def test_an_interrupt_that_left_a_string_exec_still_exits_130(tmp_path, where):
    """Deterministic form of the start-up case: the interrupt is raised inside ``exec`` of a string,
    as it is when it lands in dataclasses' ``__init__`` builder, and caught by the command (or by
    ``__main__`` while ``pyrovae.cli`` loads). Under ``python -m``, CPython then used to end the
    process by SIGINT (-2) after it had printed its line."""
    (tmp_path / "interrupted_run.py").write_text(
        "import runpy, sys\n"
        "def interrupted(*args):\n"
        "    exec('raise KeyboardInterrupt', {})\n"
        + ("import pyrovae.cli\npyrovae.cli._guarded = interrupted\n" if where == "command" else
           "import builtins\nreal = builtins.__import__\n"
           "builtins.__import__ = lambda name, *a, **k: interrupted() if name == 'pyrovae.cli' else real(name, *a, **k)\n")
        + "runpy.run_module('pyrovae', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-m", "interrupted_run"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "pyrovae: interrupted\n"


def test_an_interrupt_while_the_libraries_load_is_held_until_they_have():
    """Inside the held block a SIGINT raises nothing (the import goes on); it is raised as
    KeyboardInterrupt when the block ends, and the previous handler is back."""
    from pyrovae.cli import _interrupts_held

    before = signal.getsignal(signal.SIGINT)
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with _interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now
            reached = True
    assert reached and signal.getsignal(signal.SIGINT) is before
    with _interrupts_held():  # no interrupt: nothing raised
        pass


@faults("a bad value on the command line: one line and a pointer to --help, not the usage block")
def test_a_command_line_error_is_one_line():
    code, _, err = _cli("train", "--lr", "-1")
    assert code == 2
    assert err.splitlines() == ["pyrovae train: error: train.lr must be a positive learning rate such as 1e-3, got "
                                "-1.0 (see pyrovae train --help)"]


@faults("the resume command printed under torchrun keeps --standalone")
def test_the_torchrun_resume_command_keeps_standalone(monkeypatch):
    from pyrovae.distributed import World
    from pyrovae.runs import _launcher

    monkeypatch.setattr(World, "active", property(lambda self: True))
    assert _launcher(World(rank=0, size=2)) == "torchrun --standalone --nproc_per_node 2 -m pyrovae"


def test_the_module_counts_its_cases():
    assert len(FAULTS) == len(set(FAULTS)) >= 98, FAULTS
