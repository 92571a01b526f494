"""Reliability: bad input and faults each end in a clear error or a clean recovery, losing nothing.

``FAULTS`` lists every case this module proves; ``test_the_module_counts_its_cases`` keeps the count
honest.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, binary_images, image_folder, synthetic_data
from pyrovae import Config, ModelConfig, build_vae, fit, train_step
from pyrovae.checkpoint import CheckpointError, load_checkpoint, load_vae, save_checkpoint
from pyrovae.cli import main
from pyrovae.config import ConfigError
from pyrovae.data import DatasetNotFoundError, MNIST_FILES, load_mnist
from pyrovae.likelihoods import DataSupportError
from pyrovae.model import ImageShapeError
from pyrovae.engine import NonFiniteLossError, make_optimizer
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
    return subprocess.Popen([sys.executable, "-m", "pyrovae", "train", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


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
           "rng": {"torch": state["noise_rng"]["torch"], "data_epoch_start": state["data_rng"], "cuda": None}}
    torch.save(old, path)


@faults("a version-1 checkpoint (older pyrovae) loads and resumes exactly")
def test_a_version_1_checkpoint_resumes_exactly(tmp_path):
    straight = _run(tmp_path / "straight", epochs=2)
    _run(tmp_path / "old", epochs=2, max_steps=8)
    _as_version_1(tmp_path / "old" / "checkpoint.pt")
    resumed = _run(tmp_path / "old", resume=True, epochs=2)
    _assert_same_run(resumed, straight, tmp_path / "old", tmp_path / "straight")


@faults("a checkpoint of a version this pyrovae does not know")
def test_an_unknown_checkpoint_version_is_refused_with_what_to_do(tmp_path):
    _run(tmp_path / "run", epochs=1)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    state["version"] = 99
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="version 99.*reads versions 1 to 2.*train it afresh"):
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
    monkeypatch.setattr(runs, "build_objective", lambda name, vae, particles: _NaNAt(real(name, vae, particles), at=8))
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
    (case("an unknown prior name"), lambda: Config().replace(model={"prior": "cauchy"}), ConfigError, "valid: "),
    (case("an unknown likelihood name"), lambda: Config().replace(model={"likelihood": "x"}), ConfigError, "valid: "),
    (case("an unknown posterior name"), lambda: Config().replace(model={"posterior": "x"}), ConfigError, "valid: "),
    (case("a config written with the old key model.guide"), lambda: Config.from_dict({"model": {"guide": "iaf"}}),
     ConfigError, "model.guide is now model.posterior"),
    (case("an unknown network name"), lambda: Config().replace(model={"network": "x"}), ConfigError, "valid: auto"),
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
    assert "only --epochs and --max-steps" in capsys.readouterr().err


def test_the_module_counts_its_cases():
    assert len(FAULTS) == len(set(FAULTS)) >= 20, FAULTS
