"""The faster steps against the eager step: the same run, bit for bit or to float32 rounding."""

import pyro
import pytest
import torch

from helpers import synthetic_data
from pyrovae import Config, build_vae
from pyrovae.compiled import StaticStep, compile_loss
from pyrovae.engine import make_optimizer, train_step
from pyrovae.objectives import build_objective
from pyrovae.runs import train_run

TINY = Config().replace(model={"z_dim": 4, "hidden": (32,)})


def _setup(objective="meanfield"):
    torch.manual_seed(0)
    vae = build_vae(TINY.model)
    return vae, build_objective(objective, vae, 3), make_optimizer(vae.parameters(), 1e-3, torch.device("cpu"))


def _batches(n=5, batch=16):
    g = torch.Generator().manual_seed(1)
    return [torch.bernoulli(torch.full((batch, 1, 28, 28), 0.3), generator=g) for _ in range(n)]


@pytest.mark.parametrize("objective", ["meanfield", "elbo", "manual_analytic", "iwae"])
def test_a_replayed_static_step_is_the_eager_step(objective):
    """The step a CUDA graph replays (static input and kl-weight buffers, the same function), run on
    the CPU: every step, KL warm-up and a non-finite batch included, equals the eager step bit for bit."""
    xs = _batches()
    xs[2] = xs[2].clone()
    xs[2][0, 0, 0, 0] = float("nan")  # a bad batch: the guard must skip it on both paths
    weights = [0.1, 0.4, 0.7, 1.0, 1.0]
    runs = []
    for replay in (False, True):
        vae, loss_fn, optimizer = _setup(objective)
        step = StaticStep(loss_fn, optimizer, xs[0], capture=False) if replay else None
        torch.manual_seed(5)
        losses = []
        with pyro.validation_enabled(False):
            for x, w in zip(xs, weights):
                result = step(x, w) if replay else train_step(loss_fn, optimizer, x, kl_weight=w)
                losses.append((result.loss.clone(), bool(result.loss_finite)))
        runs.append((losses, vae.state_dict()))
    (eager_losses, eager_params), (static_losses, static_params) = runs
    assert [ok for _, ok in eager_losses] == [True, True, False, True, True]
    for (a, ok_a), (b, ok_b) in zip(eager_losses, static_losses):
        assert ok_a == ok_b and (torch.equal(a, b) or not ok_a)
    for name, value in eager_params.items():
        assert torch.equal(value, static_params[name]), name


def test_the_compiled_hand_coded_loss_trains_like_the_eager_one():
    xs = _batches(3)
    results = []
    for compiled in (False, True):
        vae, loss_fn, optimizer = _setup("manual_analytic")
        loss_fn = compile_loss(loss_fn) if compiled else loss_fn
        torch.manual_seed(5)
        losses = [train_step(loss_fn, optimizer, x).loss for x in xs]
        results.append((torch.stack(losses), vae.state_dict()))
    torch.testing.assert_close(results[0][0], results[1][0])  # float32 rounding: the compiler fuses
    for name, value in results[0][1].items():
        torch.testing.assert_close(value, results[1][1][name], msg=name)


def test_a_failed_compilation_falls_back_to_eager_with_one_line():
    vae, loss_fn, optimizer = _setup("manual_analytic")
    lines = []
    wrapped = compile_loss(loss_fn, lines.append)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")
    object.__setattr__(wrapped, "compiled", broken)
    x = _batches(1)[0]
    torch.manual_seed(5)
    expected = loss_fn(x)
    torch.manual_seed(5)
    assert torch.equal(wrapped(x), expected)
    assert lines == ["note: torch.compile failed (RuntimeError: no C++ compiler found); training in eager mode"]
    assert [n for n, _ in wrapped.named_parameters()] == [f"module.{n}" for n, _ in loss_fn.named_parameters()]


def test_the_switches_reach_a_run_and_cuda_graph_says_it_needs_cuda(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiled.append(module) or module)
    lines = []
    data = synthetic_data(200, 50)
    config = TINY.replace(train={"objective": "manual_analytic", "compile": True, "cuda_graph": True,
                                 "batch_size": 50, "max_steps": 3, "device": "cpu"})
    run = train_run(config, tmp_path / "run", data=data, log=lines.append)
    assert any("cuda_graph applies on CUDA only" in line for line in lines)
    assert run.metrics["partial_epoch"]["steps"] == 3 and run.config.train.compile
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "ManualELBO"  # the loss module went to the compiler


@pytest.mark.cuda
@pytest.mark.parametrize("objective", ["meanfield", "manual_analytic"])
def test_a_captured_cuda_graph_step_trains_like_the_eager_step(objective):
    """On a GPU, the captured graph against the eager step from the same start on the same batches.

    A graph draws its noise at its own offsets of the generator, so the two runs agree in
    distribution, not bit for bit: both must lower the -ELBO of a held-out batch from where they
    started, by amounts within a fifth of each other. A non-finite batch leaves the parameters as
    they were, and the replay's loss follows the input copied into the static buffer."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(1)
    xs = [torch.bernoulli(torch.full((64, 1, 28, 28), 0.2), generator=g).to(device) for _ in range(41)]
    held, xs = xs[0], xs[1:]

    def held_loss(loss_fn):
        torch.manual_seed(9)
        with torch.no_grad():
            return float(sum(loss_fn(held) for _ in range(8))) / 8

    gains = []
    for graph in (False, True):
        torch.manual_seed(0)
        vae = build_vae(TINY.model).to(device)
        loss_fn = build_objective(objective, vae, 3)
        optimizer = make_optimizer(vae.parameters(), 3e-3, device)
        start = held_loss(loss_fn)
        step = StaticStep(loss_fn, optimizer, xs[0]) if graph else None
        assert (step is not None and step.graph is not None) == graph
        torch.manual_seed(5)
        with pyro.validation_enabled(False):
            for x in xs:
                step(x, 1.0) if graph else train_step(loss_fn, optimizer, x, kl_weight=1.0)
            if graph:
                before = [p.detach().clone() for p in vae.parameters()]
                bad = xs[0].clone()
                bad[0, 0, 0, 0] = float("nan")
                assert not bool(step(bad, 1.0).loss_finite)
                for p, q in zip(vae.parameters(), before):
                    assert torch.equal(p, q)
                empty, full = float(step(torch.zeros_like(xs[0]), 1.0).loss), float(step(xs[0], 1.0).loss)
                assert empty != full
        torch.cuda.synchronize()
        gains.append(start - held_loss(loss_fn))
    eager, graphed = gains
    assert eager > 0 and graphed > 0
    assert abs(graphed - eager) <= 0.2 * eager, gains
