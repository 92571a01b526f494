"""TensorBoard logging: the event files read back hold the run's figures."""

import pytest

from helpers import synthetic_data
from pyrovae import Config
from pyrovae.runs import train_run

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'pyrovae[tensorboard]')")


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_a_run_logs_losses_terms_and_grids_every_epoch(tmp_path):
    config = Config().replace(model={"z_dim": 4, "hidden": (32,)},
                              train={"epochs": 2, "batch_size": 100, "log_every_steps": 2, "tensorboard": True})
    metrics = train_run(config, tmp_path / "run", data=synthetic_data(600, 100), quiet=True).metrics
    events = _events(tmp_path / "run" / "tensorboard")
    steps = [e.step for e in events.Scalars("train/neg_elbo_step")]
    assert steps == [2, 4, 6, 8, 10, 12]  # every log_every_steps steps, 6 steps an epoch
    assert all(0 < e.value < 1000 for e in events.Scalars("train/neg_elbo_step"))
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([1e-3] * 6)
    for key in ("train_neg_elbo", "test_neg_elbo", "test_reconstruction", "test_kl"):
        logged = events.Scalars(f"epoch/{key}")
        assert [e.step for e in logged] == [6, 12]
        assert [e.value for e in logged] == pytest.approx([row[key] for row in metrics["epochs"]], rel=1e-6)
    for tag in ("reconstructions", "samples"):
        assert len(events.Images(tag)) == 2


def test_a_resumed_run_continues_the_curves_without_folding_back(tmp_path):
    config = Config().replace(model={"z_dim": 4, "hidden": (32,)},
                              train={"batch_size": 100, "log_every_steps": 2, "tensorboard": True})
    data = synthetic_data(600, 100)
    train_run(config.replace(train={"max_steps": 4}), tmp_path / "run", data=data, quiet=True)
    train_run(config.replace(train={"epochs": 1}), tmp_path / "run", data=data, quiet=True, resume=True)
    steps = [e.step for e in _events(tmp_path / "run" / "tensorboard").Scalars("train/neg_elbo_step")]
    assert steps == [2, 4, 6]
