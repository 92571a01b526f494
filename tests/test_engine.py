"""The training engine on small synthetic data: the loss falls, runs are reproducible, outputs are
complete, and a step never waits on the device."""

import json

import pyro
import pytest
import torch

from helpers import CountHostReads, binary_images, synthetic_data
from pyrovae import Config, build_vae, fit, train_step
from pyrovae.stream import epoch_batches
from pyrovae.checkpoint import load_vae
from pyrovae.config import ConfigError
from pyrovae.engine import make_optimizer
from pyrovae.evaluate import evaluate
from pyrovae.objectives import OBJECTIVES, build_objective
from pyrovae.runs import RunFolderError, train_run

SMALL = Config().replace(model={"z_dim": 8, "hidden": (64,)}, train={"batch_size": 100})


def test_training_lowers_the_loss():
    data = synthetic_data(n_train=1000, n_test=200)
    vae = build_vae(SMALL.model)
    before = evaluate(vae, data.test)["neg_elbo"]
    loss_fn = build_objective("trace_elbo", vae)
    opt = make_optimizer(vae.parameters(), 1e-3, torch.device("cpu"))
    state = fit(SMALL.replace(train={"epochs": 3}), vae, loss_fn, opt, data, quiet=True)
    losses = [row["train_neg_elbo"] for row in state.history]
    assert losses[-1] < losses[0] - 20
    assert evaluate(vae, data.test)["neg_elbo"] < before - 50


def test_fit_in_memory_equals_the_run_folder_and_returns_the_trained_model(tmp_path):
    data = synthetic_data()
    config = SMALL.replace(train={"epochs": 2})
    pyro.set_rng_seed(config.train.seed)
    vae = build_vae(config.model)
    loss_fn = build_objective(config.train.objective, vae)
    state = fit(config, vae, loss_fn, make_optimizer(vae.parameters(), config.train.lr, torch.device("cpu")), data,
                quiet=True)
    run = train_run(config, tmp_path / "run", data=data, quiet=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(state.history) == strip(run.metrics["epochs"])
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), run.vae.state_dict().values()))


def test_same_seed_same_numbers_and_other_seed_different(tmp_path):
    data = synthetic_data()
    config = SMALL.replace(train={"epochs": 2})
    a, b, c = (train_run(config.replace(train={"seed": seed}), tmp_path / name, data=data, quiet=True).metrics
               for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    strip = lambda m: [{k: v for k, v in row.items() if k != "seconds"} for row in m["epochs"]]  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_run_writes_outputs_and_checkpoint_reloads(tmp_path):
    out = tmp_path / "run"
    data = synthetic_data()
    metrics = train_run(SMALL.replace(train={"epochs": 2}), out, data=data, quiet=True).metrics
    for name in ("config.json", "metrics.json", "checkpoint.pt", "loss_curve.png", "reconstructions.png",
                 "samples.png"):
        assert (out / name).is_file(), name
    assert not (out / "manifold.png").exists()  # only for a 2-D latent space
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["epochs"] == metrics["epochs"] and len(saved["epochs"]) == 2
    for key in ("seed", "versions", "device", "git_commit", "command"):
        assert key in saved
    assert Config.load(out / "config.json") == Config.from_dict(saved["config"])

    vae, config, checkpoint = load_vae(out / "checkpoint.pt")
    assert checkpoint["state"]["epoch"] == 2 and set(checkpoint["optimizer"]) == {"state", "param_groups"}
    assert evaluate(vae, data.test)["neg_elbo"] == pytest.approx(metrics["epochs"][-1]["test_neg_elbo"], abs=1e-4)


def test_refuses_to_overwrite_another_run(tmp_path):
    out, data = tmp_path / "run", synthetic_data()
    train_run(SMALL.replace(train={"epochs": 1}), out, data=data, quiet=True)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(RunFolderError, match="--overwrite"):
        train_run(SMALL.replace(train={"epochs": 1}), out, data=data, quiet=True)
    assert (out / "checkpoint.pt").read_bytes() == before


# --- a step that never waits on the device --------------------------------------------------------
def _steps(objective: str, steps: int, monkeypatch) -> list[str]:
    vae = build_vae(SMALL.model)
    loss_fn = build_objective(objective, vae, 3)
    opt = make_optimizer(vae.parameters(), 1e-3, torch.device("cpu"))
    x = binary_images(32)
    with pyro.validation_enabled(False):
        train_step(loss_fn, opt, x)  # the first step creates the optimizer state
        counter = CountHostReads(monkeypatch)
        for _ in range(steps):
            train_step(loss_fn, opt, x, kl_weight=0.5, grad_clip=10.0)
    monkeypatch.undo()
    return counter.calls


@pytest.mark.parametrize("objective", ["manual_analytic", "manual_mc", "manual_iwae"])
def test_a_hand_coded_step_reads_nothing_back_from_the_device(objective, monkeypatch):
    assert _steps(objective, 5, monkeypatch) == []


def test_the_counter_sees_host_reads_and_stock_pyro_makes_them(monkeypatch):
    """The counting cannot pass by accident: stock Trace_ELBO reads its surrogate loss (torch_item) and
    checks it for NaN on the host, and the counter sees those reads."""
    calls = _steps("trace_elbo", 5, monkeypatch)
    assert len(calls) >= 5 and len(calls) % 5 == 0


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_the_on_device_guard_skips_a_non_finite_step_entirely(objective):
    """A NaN in the batch gives a NaN loss: the fused kernel must leave parameters, moments and the
    step count exactly as they were, with no host read to decide it."""
    vae = build_vae(SMALL.model.__class__(z_dim=4, hidden=(16,), likelihood="normal",
                                          likelihood_options={"scale": "fixed"}))
    loss_fn = build_objective(objective[0], vae, 2, implementation=objective[1])
    opt = make_optimizer(vae.parameters(), 1e-2, torch.device("cpu"))
    x = torch.rand(8, 1, 28, 28)
    with pyro.validation_enabled(False):
        train_step(loss_fn, opt, x)
        before = ({k: v.clone() for k, v in vae.state_dict().items()},
                  {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()})
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        result = train_step(loss_fn, opt, bad)
    assert not bool(result.loss_finite & result.grads_finite.all())
    assert all(torch.equal(before[0][k], v) for k, v in vae.state_dict().items())
    after = opt.state_dict()["state"]
    assert all(torch.equal(before[1][i][k], after[i][k]) for i in after for k in after[i])


def test_the_data_stream_resumes_part_way_through_an_epoch():
    data = synthetic_data(n_train=250)
    all_batches = list(epoch_batches(data, 100, seed=0, epoch=0))
    rest = list(epoch_batches(data, 100, seed=0, epoch=0, first_step=2))
    assert len(all_batches) == 3 and len(rest) == 1 and torch.equal(rest[0], all_batches[2])
    assert not torch.equal(next(epoch_batches(data, 100, 0, 1)), all_batches[0])  # a new order each epoch
    assert not torch.equal(next(epoch_batches(data, 100, 1, 0)), all_batches[0])  # and for each seed


def _order_data(device):
    """Images that are their own index (ready as they are: no binarization draws)."""
    from pyrovae.data import Prepared

    n = 250
    return Prepared(torch.arange(n).float().view(n, 1, 1, 1).to(device), None, torch.zeros(1, 1, 1, 1),
                    torch.zeros(1), "unit")


def test_the_data_order_is_a_function_of_seed_epoch_and_step():
    """One seed at the same (epoch, step) takes the same images, whatever came before."""
    data = _order_data("cpu")
    first = [b.flatten().tolist() for b in epoch_batches(data, 100, 3, 0)]
    assert [x.flatten().tolist() for x in epoch_batches(data, 100, 3, 4, first_step=1)] == \
        [x.flatten().tolist() for x in epoch_batches(data, 100, 3, 4)][1:]
    assert sorted(sum(first, [])) == list(range(250))


@pytest.mark.cuda
def test_the_same_seed_takes_the_same_images_in_the_same_order_on_cuda_and_on_the_cpu():
    orders = [[b.flatten().cpu().tolist() for b in epoch_batches(_order_data(d), 64, 7, 0)] for d in ("cpu", "cuda")]
    assert orders[0] == orders[1]


def test_a_spent_time_budget_stops_with_a_checkpoint_and_the_run_resumes_exactly(tmp_path):
    """train.max_seconds: past the deadline the run checkpoints and stops (no error, saying so), and
    its resumption ends where a straight run ends."""
    config = Config().replace(model={"z_dim": 4, "hidden": (32,)}, train={"batch_size": 100, "epochs": 2})
    data = synthetic_data(n_train=600, n_test=100)
    straight = train_run(config, tmp_path / "straight", data=data, quiet=True)
    lines = []
    stopped = train_run(config.replace(train={"max_seconds": 1e-9}), tmp_path / "pieces", data=data, log=lines.append)
    assert stopped.metrics["stopped_at_step"] == 1 and any("train.max_seconds" in line for line in lines), lines
    resumed = train_run(config, tmp_path / "pieces", data=data, quiet=True, resume=True)
    for name, value in straight.vae.state_dict().items():
        assert torch.equal(value, resumed.vae.state_dict()[name]), name
    with pytest.raises(ConfigError, match="train.max_seconds must be a positive number"):
        config.replace(train={"max_seconds": 0})


def test_a_step_whose_gradient_norm_passes_skip_norm_changes_nothing_and_is_counted():
    """VDVAE's guard: the update is dropped on the device (parameters and Adam moments as they were)
    and the epoch's row counts it; a threshold above the norm leaves the step alone."""
    vae = build_vae(SMALL.model.__class__(z_dim=4, hidden=(16,)))
    loss_fn = build_objective("meanfield", vae)
    opt = make_optimizer(vae.parameters(), 1e-2, torch.device("cpu"))
    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    with pyro.validation_enabled(False):
        train_step(loss_fn, opt, x)
        before = {k: v.clone() for k, v in vae.state_dict().items()}
        result = train_step(loss_fn, opt, x, skip_norm=1e-6)
        assert bool(result.too_large) and all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
        result = train_step(loss_fn, opt, x, skip_norm=1e12)
        assert not bool(result.too_large) and not torch.equal(before["decoder.net.0.weight"],
                                                               vae.state_dict()["decoder.net.0.weight"])
    config = SMALL.replace(train={"skip_grad_norm": 1e-6, "epochs": 1, "batch_size": 100})
    vae = build_vae(config.model)
    start = {k: v.clone() for k, v in vae.state_dict().items()}
    state = fit(config, vae, build_objective("meanfield", vae), make_optimizer(vae.parameters(), 1e-3, torch.device(
        "cpu")), synthetic_data(300, 20), quiet=True)
    assert state.history[-1]["skipped_steps"] == 3
    assert all(torch.equal(start[k], v) for k, v in vae.state_dict().items())
    with pytest.raises(ConfigError, match="train.skip_grad_norm must be a positive number"):
        SMALL.replace(train={"skip_grad_norm": 0})
