"""Training on a small MNIST slice: the loss falls, runs are reproducible, outputs are complete."""

import json

import pytest
import torch

from pyrovae import Config, build_vae
from pyrovae.checkpoint import load_vae
from pyrovae.data import batches
from pyrovae.evaluate import evaluate
from pyrovae.objectives import PyroELBO
from pyrovae.run import RunFolderError, train_run
from pyrovae.train import make_optimizer, train_epoch

SMALL = Config().replace(model={"z_dim": 8, "hidden": (64,)})


def test_training_lowers_the_loss(mnist_small):
    train, test_binary, _ = mnist_small
    torch.manual_seed(0)
    vae = build_vae(SMALL.model)
    opt = make_optimizer(vae.parameters(), 1e-3, torch.device("cpu"))
    before = evaluate(vae, test_binary)["neg_elbo"]
    g = torch.Generator().manual_seed(0)
    losses = [train_epoch(PyroELBO(vae), opt, batches(train, 64, g), progress=False).loss for _ in range(3)]
    after = evaluate(vae, test_binary)["neg_elbo"]
    assert losses[-1] < losses[0] - 20
    assert after < before - 100  # from ~545 nats (untrained) to ~200


def _small_run(mnist_root, out, seed=0, **train):
    cfg = SMALL.replace(data={"data_dir": str(mnist_root)},
                        train={"epochs": 2, "train_subset": 1024, "test_subset": 300, "seed": seed, **train})
    return train_run(cfg, out, quiet=True)


def test_same_seed_same_numbers_and_other_seed_different(mnist_root, tmp_path):
    a = _small_run(mnist_root, tmp_path / "a")
    b = _small_run(mnist_root, tmp_path / "b")
    c = _small_run(mnist_root, tmp_path / "c", seed=1)
    strip = lambda m: [{k: v for k, v in row.items() if k != "seconds"} for row in m["epochs"]]  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_run_writes_outputs_and_checkpoint_reloads(mnist_root, tmp_path):
    out = tmp_path / "run"
    metrics = _small_run(mnist_root, out)
    for name in ("config.json", "metrics.json", "checkpoint.pt", "loss_curve.png", "reconstructions.png",
                 "samples.png"):
        assert (out / name).is_file(), name
    assert not (out / "manifold.png").exists()  # only for a 2-D latent space
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["epochs"] == metrics["epochs"] and len(saved["epochs"]) == 2
    for key in ("seed", "versions", "device", "git_commit", "command"):
        assert key in saved
    assert Config.load(out / "config.json") == Config.from_dict(saved["config"])

    vae, config, state = load_vae(out / "checkpoint.pt")
    assert state["epoch"] == 2 and set(state["optimizer"]) == {"state", "param_groups"}
    from pyrovae.run import prepare_data

    test_binary = prepare_data(config, torch.device("cpu"), download=False).test
    assert evaluate(vae, test_binary)["neg_elbo"] == pytest.approx(metrics["epochs"][-1]["test_neg_elbo"], abs=1e-4)


def test_refuses_to_overwrite_another_run(mnist_root, tmp_path):
    out = tmp_path / "run"
    _small_run(mnist_root, out, epochs=1)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(RunFolderError, match="--overwrite"):
        _small_run(mnist_root, out, epochs=1)
    assert (out / "checkpoint.pt").read_bytes() == before
