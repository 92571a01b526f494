"""Data-parallel training and evaluation: 2 processes with gloo on the CPU, started by torchrun."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, image_folder, synthetic_data
from pyrovae import Config, build_vae
from pyrovae.checkpoint import load_checkpoint
from pyrovae.data import Prepared
from pyrovae.distributed import World, shard
from pyrovae.engine import make_optimizer, train_step
from pyrovae.stream import epoch_batches, steps_per_epoch
from pyrovae.evaluate import importance_log_likelihood
from pyrovae.objectives import build_objective

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
WORKERS = str(ROOT / "tests" / "distributed_workers.py")


def _torchrun(*args, timeout=300, **kwargs):
    return subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def _worker(case, out, *args):
    result = _torchrun(WORKERS, case, str(out), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


# --- the data each process takes ------------------------------------------------------------------
def test_shards_are_disjoint_cover_the_data_and_change_between_epochs():
    n, batch = 103, 10  # the last batch of 3 is split 2 + 1
    data = Prepared(torch.arange(n).float().view(n, 1, 1, 1), None, torch.zeros(1, 1, 1, 1), torch.zeros(1), "unit")
    epochs = []
    for epoch in range(2):
        single = [b.flatten().tolist() for b in epoch_batches(data, batch, 0, epoch)]
        parts = [[b.flatten().tolist() for b in epoch_batches(data, batch, 0, epoch, world=World(rank, 2))]
                 for rank in range(2)]
        assert len(parts[0]) == len(parts[1]) == len(single) == 11  # every process takes the same number of steps
        for step, whole in enumerate(single):  # together, each step's batch is the one-process batch
            assert parts[0][step] + parts[1][step] == whole
        mine = [sorted(sum(p, [])) for p in parts]
        assert not set(mine[0]) & set(mine[1]) and sorted(mine[0] + mine[1]) == list(range(n))
        epochs.append(mine[0])
    assert epochs[0] != epochs[1]  # reshuffled each epoch, from the seed all processes share


def test_a_last_batch_smaller_than_the_world_is_dropped_by_every_process():
    assert [shard(3, World(r, 2)) for r in (0, 1)] == [slice(0, 2), slice(2, 3)]
    data = Prepared(torch.arange(21).float().view(21, 1, 1, 1), None, torch.zeros(1, 1, 1, 1), torch.zeros(1), "unit")
    counts = [len(list(epoch_batches(data, 10, 0, 0, world=World(r, 3)))) for r in range(3)]
    assert counts == [2, 2, 2] == [steps_per_epoch(21, 10, World(r, 3)) for r in range(3)]  # 10 + 10, and the last image alone cannot go to three processes


# --- 2 processes under torchrun -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("objective", ["meanfield", "manual_analytic", "iwae"])
def test_one_step_on_two_processes_equals_one_process_on_the_whole_batch(tmp_path, objective):
    ranks = _worker("one_step", tmp_path, objective)
    torch.manual_seed(0)
    vae = build_vae(Config().replace(model={"z_dim": 4, "hidden": (32,)}).model)
    x = torch.bernoulli(torch.rand(128, 1, 28, 28, generator=torch.Generator().manual_seed(1)))
    objective_fn = build_objective(objective, vae, 3)

    def both_halves(x, kl_weight):  # the same images, each half with the noise its process drew
        torch.manual_seed(100)
        first = objective_fn(x[:64], kl_weight=kl_weight)
        torch.manual_seed(101)
        return first + objective_fn(x[64:], kl_weight=kl_weight)
    train_step(both_halves, make_optimizer(vae.parameters(), 1e-3, torch.device("cpu")), x, kl_weight=0.5)
    for rank in ranks:
        for name, value in vae.state_dict().items():
            torch.testing.assert_close(rank["params"][name], value, msg=name)  # float32 rounding
    assert not torch.equal(ranks[0]["loss"], ranks[1]["loss"])  # each process scored its own half


@pytest.mark.slow
def test_training_on_two_processes_keeps_them_identical_and_writes_the_folder_once(tmp_path):
    ranks = _worker("train", tmp_path)
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    assert ranks[1]["writes"] == []
    assert any(w.endswith("checkpoint.pt") for w in ranks[0]["writes"])
    metrics = ranks[0]["metrics"]
    assert metrics["world_size"] == 2 and metrics["batch_size"] == {"global": 100, "per_process": 50.0}
    assert metrics["epochs"][1]["steps"] == 14  # 7 steps an epoch: 6 of 100 images, 1 of 10 (5 each)
    timeless = [[{k: v for k, v in row.items() if k != "seconds"} for row in r["metrics"]["epochs"]] for r in ranks]
    assert timeless[0] == timeless[1]  # the sums are all-reduced


@pytest.mark.slow
def test_distributed_iwae_equals_one_process(tmp_path):
    ranks = _worker("iwae", tmp_path)
    torch.manual_seed(0)
    vae = build_vae(Config().replace(model={"z_dim": 4, "hidden": (32,)}).model).eval()
    test = synthetic_data(n_train=610, n_test=100).test
    single = importance_log_likelihood(vae, test.repeat(3, 1, 1, 1)[:250], k=20, batch_size=40)
    for rank in ranks:
        assert rank["neg_log_likelihood"] == pytest.approx(single["neg_log_likelihood"], rel=1e-12)
        assert rank["neg_elbo"] == pytest.approx(single["neg_elbo"], rel=1e-12)


# --- the command line under torchrun: signals and failures ----------------------------------------
def _cli_args(images, out, *extra):
    return ["-m", "pyrovae", "train", "--dataset", f"folder:{images}", "--out", str(out), "--z-dim", "2",
            "--hidden", "16", "--batch-size", "20", "--quiet", *extra]


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_once_and_the_resumed_run_equals_the_straight_one(tmp_path):
    images = image_folder(tmp_path / "images", 400, 40)
    straight = _torchrun(*_cli_args(images, tmp_path / "straight", "--epochs", "3"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = subprocess.Popen([*TORCHRUN, *_cli_args(images, tmp_path / "pieces", "--epochs", "3", "--checkpoint-every",
                                                  "1")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (tmp_path / "pieces" / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0 and 'pyrovae/' not in err, err[-3000:]  # (torchrun prints its own traceback)
    assert f"--resume {tmp_path / 'pieces'}" in err and "torchrun --standalone --nproc_per_node 2" in err
    resumed = _torchrun(*_cli_args(images, tmp_path / "pieces", "--epochs", "3")[:3], "--resume",
                        str(tmp_path / "pieces"), "--epochs", "3", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "pieces")
    assert a["state"]["step"] == b["state"]["step"]
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert len(b["state"]["rank_noise_rng"]) == 2


@pytest.mark.slow
def test_a_killed_process_ends_the_run_with_an_error_not_a_hang(tmp_path):
    images = image_folder(tmp_path / "images", 400, 40)
    run = subprocess.Popen([*TORCHRUN, *_cli_args(images, tmp_path / "run", "--epochs", "1000")], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYROVAE_COLLECTIVE_TIMEOUT": "30"})
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    start = time.time()
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0 and time.time() - start < 60
    assert "SIGKILL" in err or "lost the other processes" in err, err[-3000:]
    load_checkpoint(tmp_path / "run")  # the last checkpoint is intact


@pytest.mark.slow
def test_evaluate_under_torchrun_equals_one_process_and_records_the_world(tmp_path):
    images = image_folder(tmp_path / "images", 200, 90)
    trained = subprocess.run([sys.executable, *_cli_args(images, tmp_path / "run", "--max-steps", "3")], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "pyrovae", "evaluate", str(tmp_path / "run"), "--particles", "7",
                          "--out", str(tmp_path / "one.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun("-m", "pyrovae", "evaluate", str(tmp_path / "run"), "--particles", "7",
                    "--out", str(tmp_path / "two.json"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for key in ("neg_elbo", "reconstruction", "kl", "neg_log_likelihood"):
        assert b["test"][key] == pytest.approx(a["test"][key], rel=1e-9), key
    assert two.stdout.count("test -ELBO") == 1  # printed once, by rank 0
