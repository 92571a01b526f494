"""The faster steps against the eager step: the same run, bit for bit or to float32 rounding."""

import dataclasses

import pyro
import pytest
import torch

from helpers import assert_traced_equals_eager, synthetic_data
from pyrovae import Config, build_vae
from pyrovae.config import ConfigError
from pyrovae.compiled import StaticStep, TracedLoss, compile_loss, log1p_by_log
from pyrovae.engine import make_optimizer, train_step
from pyrovae.objectives import build_objective
from pyrovae.runs import train_run

TINY = Config().replace(model={"z_dim": 4, "hidden": (32,)})


def _setup(objective="meanfield"):
    """The tiny VAE, its objective and Adam; "<objective> stack": two stochastic layers (4 and 2),
    bottom-up, with a VampPrior on the top one."""
    torch.manual_seed(0)
    objective, _, stack = objective.partition(" ")
    model = TINY.model if not stack else dataclasses.replace(TINY.model, latents=(4, 2), inference="bottom_up",
                                                             prior="vamp", prior_options={"components": 3})
    vae = build_vae(model)
    return vae, build_objective(objective, vae, 3), make_optimizer(vae.parameters(), 1e-3, torch.device("cpu"))


def _batches(n=5, batch=16, bad=None):
    """``n`` binary batches; batch ``bad`` (if given) with a NaN pixel, which the guard must skip."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.bernoulli(torch.full((batch, 1, 28, 28), 0.3), generator=g) for _ in range(n)]
    if bad is not None:
        xs[bad][0, 0, 0, 0] = float("nan")
    return xs


@pytest.mark.parametrize("objective", ["meanfield", "elbo", "manual_analytic", "iwae"])
def test_a_replayed_static_step_is_the_eager_step(objective):
    """The step a CUDA graph replays (static input and kl-weight buffers, the same function), run on
    the CPU: every step, KL warm-up and a non-finite batch included, equals the eager step bit for bit."""
    xs = _batches(bad=2)  # a bad batch: the guard must skip it on both paths
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


@pytest.mark.parametrize("objective", ["meanfield", "manual_analytic"])
def test_the_compiled_loss_trains_like_the_eager_one(objective):
    """The loss traced below Python and compiled by inductor against the eager loss, step by step
    from the same start with the same noise: KL warm-up and a skipped non-finite batch included, the
    losses and parameters agree to float32 rounding (the compiler fuses and reorders arithmetic)."""
    xs = _batches(5, bad=2)
    results = []
    for compiled in (False, True):
        vae, loss_fn, optimizer = _setup(objective)
        lines = []
        loss_fn = compile_loss(loss_fn, lines.append) if compiled else loss_fn
        torch.manual_seed(5)
        with pyro.validation_enabled(False):
            steps = [train_step(loss_fn, optimizer, x, kl_weight=w) for x, w in zip(xs, [0.2, 0.6, 1.0, 1.0, 1.0])]
        assert not lines and (not compiled or loss_fn.graph is not None)
        results.append(([s.loss for s in steps], [bool(s.loss_finite) for s in steps], vae.state_dict()))
    assert results[0][1] == results[1][1] == [True, True, False, True, True]
    for a, b, finite in zip(results[0][0], results[1][0], results[0][1]):
        if finite:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-3)
    for name, value in results[0][2].items():
        torch.testing.assert_close(results[1][2][name], value, rtol=1e-5, atol=1e-6, msg=name)


def _graph_only(graph):
    """The traced graph run as it is, without a compiler: what the trace itself computes."""
    return graph


@pytest.mark.parametrize("objective", ["meanfield", "elbo", "manual_analytic", "manual_mc", "iwae", "manual_iwae"])
def test_the_trace_computes_the_eager_loss_and_gradients_bit_for_bit(objective):
    """The graph make_fx records (Pyro's handlers run only then) against the eager loss, on a batch
    shape it was traced for and under the same noise: equal bit for bit, gradients included; another
    batch shape takes the eager loss."""
    vae, loss_fn, _ = _setup(objective)
    traced = TracedLoss(loss_fn, compiler=_graph_only)
    for x in (*_batches(2), _batches(1, batch=7)[0]):
        assert_traced_equals_eager(loss_fn, traced, vae, x)
    assert traced.key[0] == (16, 1, 28, 28)


def test_every_part_traces_to_the_eager_loss():
    """Every prior, likelihood and posterior in the registries under the default objective: the
    traced graph gives the eager loss bit for bit, and none of them needs the eager fallback."""
    from pyrovae.likelihoods import LIKELIHOODS
    from pyrovae.posteriors import POSTERIORS
    from pyrovae.priors import PRIORS
    from helpers import small_options

    x = torch.bernoulli(torch.full((6, 1, 4, 4), 0.4), generator=torch.Generator().manual_seed(2))
    fell_back = []
    for kind, names in (("prior", PRIORS), ("likelihood", LIKELIHOODS), ("posterior", POSTERIORS)):
        for name in names:
            torch.manual_seed(0)
            options = {"prior_options": small_options(PRIORS[name])} if kind == "prior" else {}
            vae = build_vae(dataclasses.replace(TINY.model, z_dim=2, hidden=(8,), **{kind: name}, **options), (1, 4, 4))
            loss_fn = build_objective("meanfield", vae)
            lines = []
            traced = TracedLoss(loss_fn, lines.append, compiler=_graph_only)
            losses = []
            for fn in (loss_fn, traced):
                torch.manual_seed(4)
                with pyro.validation_enabled(False):
                    losses.append(fn(x, kl_weight=1.0).detach())
            assert torch.equal(losses[0], losses[1]), (kind, name)
            if lines:
                assert len(lines) == 1 and "training in eager mode" in lines[0], lines
                fell_back.append(f"{kind} {name}")
    assert not fell_back, fell_back  # every registered part runs as a graph


def test_a_loss_that_reads_the_host_falls_back_to_eager_with_one_line():
    """Stock Trace_ELBO calls .item() on every site's log-density: no graph can hold that."""
    vae, loss_fn, _ = _setup("trace_elbo")
    lines = []
    wrapped = compile_loss(loss_fn, lines.append)
    x = _batches(1)[0]
    torch.manual_seed(5)
    expected = loss_fn(x)
    torch.manual_seed(5)
    assert torch.equal(wrapped(x), expected) and wrapped.graph is None
    assert lines == ["note: train.compile: tracing failed (the loss reads a value back to the host (.item() or a "
                     "branch on a tensor's value), which a graph cannot hold); training in eager mode"]


def test_a_failed_compilation_falls_back_to_eager_with_one_line():
    vae, loss_fn, optimizer = _setup("manual_analytic")
    lines = []

    def broken(graph):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run
    wrapped = TracedLoss(loss_fn, lines.append, compiler=broken)
    x = _batches(1)[0]
    torch.manual_seed(5)
    expected = loss_fn(x)
    torch.manual_seed(5)
    assert torch.equal(wrapped(x), expected)
    assert lines == ["note: train.compile: compiling failed (RuntimeError: no C++ compiler found); "
                     "training in eager mode"]
    assert [n for n, _ in wrapped.named_parameters()] == [f"module.{n}" for n, _ in loss_fn.named_parameters()]


def test_the_switches_reach_a_run_and_cuda_graph_says_it_needs_cuda(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr("pyrovae.compiled.compile_at_first_call", lambda graph: compiled.append(graph) or graph)
    lines = []
    data = synthetic_data(200, 50)
    config = TINY.replace(train={"objective": "manual_analytic", "compile": True, "cuda_graph": True,
                                 "batch_size": 50, "max_steps": 3, "device": "cpu"})
    run = train_run(config, tmp_path / "run", data=data, log=lines.append)
    assert any("cuda_graph applies on CUDA only" in line for line in lines)
    assert run.metrics["partial_epoch"]["steps"] == 3 and run.config.train.compile
    assert len(compiled) == 1 and isinstance(compiled[0], torch.fx.GraphModule)  # the traced loss went to the compiler


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


def test_cuda_graph_is_auto_by_default_and_takes_only_auto_true_or_false():
    assert Config().train.cuda_graph == "auto"
    for value in (True, False, "auto"):
        assert TINY.replace(train={"cuda_graph": value}).train.cuda_graph == value
    for value in ("yes", 1, 0, None):
        with pytest.raises(ConfigError, match="train.cuda_graph must be auto, true or false"):
            TINY.replace(train={"cuda_graph": value})


def test_auto_says_nothing_on_the_cpu(tmp_path):
    lines = []
    config = TINY.replace(train={"batch_size": 50, "max_steps": 2, "device": "cpu"})
    train_run(config, tmp_path / "run", data=synthetic_data(200, 50), log=lines.append)
    assert not any("cuda_graph" in line for line in lines)


class _FixedNoise:
    """Every standard-normal draw of torch's distributions read from one buffer, refilled before each
    step from a seeded CPU generator: the eager and the captured step then see the same noise."""

    def __init__(self, monkeypatch, numel: int, device):
        self.buffer, self.g = torch.zeros(numel, device=device), torch.Generator().manual_seed(3)
        monkeypatch.setattr(torch.distributions.normal, "_standard_normal",
                            lambda shape, dtype, device: self.buffer[:torch.Size(shape).numel()].view(shape))

    def next(self):
        self.buffer.copy_(torch.randn(self.buffer.shape, generator=self.g))


@pytest.mark.cuda
@pytest.mark.parametrize("objective", ["meanfield", "elbo", "manual_analytic", "iwae"])
def test_the_captured_cuda_graph_step_equals_the_eager_step_under_the_same_noise(objective, monkeypatch):
    """The graph against the eager step from the same start, batches and noise: losses, non-finite
    flags and parameters after every step agree to float32 rounding (a non-finite batch included)."""
    device = torch.device("cuda")
    xs = [x.to(device) for x in _batches(8, 64, bad=5)]
    runs = []
    for graph in (False, True):
        noise = _FixedNoise(monkeypatch, 3 * 64 * 4, device)
        torch.manual_seed(0)
        vae = build_vae(TINY.model).to(device)
        loss_fn = build_objective(objective, vae, 3)
        optimizer = make_optimizer(vae.parameters(), 3e-3, device)
        step = StaticStep(loss_fn, optimizer, xs[0]) if graph else None
        assert (step is not None and step.graph is not None) == graph
        trace = []
        with pyro.validation_enabled(False):
            for i, x in enumerate(xs):
                noise.next()
                r = step(x, 0.5) if graph else train_step(loss_fn, optimizer, x, kl_weight=0.5)
                trace.append((r.loss.clone(), bool(r.loss_finite), [p.detach().clone() for p in vae.parameters()]))
        runs.append(trace)
    for (loss_a, fin_a, params_a), (loss_b, fin_b, params_b) in zip(*runs):
        assert fin_a == fin_b
        if fin_a:
            torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-4)
        for p, q in zip(params_a, params_b):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_a_step_that_reads_the_host_is_not_captured_and_leaves_the_run_as_it_was():
    """A loss that reads a value back to the host cannot be a graph: the capture refuses it before
    capturing, with the reason, and leaves parameters, optimizer and the CUDA generator usable."""
    from pyrovae.compiled import CaptureUnsupported

    device = torch.device("cuda")
    torch.manual_seed(0)
    vae = build_vae(TINY.model).to(device)
    objective = build_objective("meanfield", vae, 3)

    class Reads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = objective

        def forward(self, x, kl_weight=1.0):
            loss = self.inner(x, kl_weight=kl_weight)
            return loss * (1.0 if float(loss) > -1e30 else 0.0)  # a host read, as a data-dependent branch
    loss_fn = Reads()
    optimizer = make_optimizer(vae.parameters(), 1e-3, device)
    before = [p.detach().clone() for p in vae.parameters()]
    x = _batches(1, 64)[0].to(device)
    with pytest.raises(CaptureUnsupported, match="reads a value back to the host"):
        StaticStep(loss_fn, optimizer, x)
    for p, q in zip(vae.parameters(), before):
        assert torch.equal(p, q)
    with pyro.validation_enabled(False):
        result = train_step(loss_fn, optimizer, x)  # the eager step still runs, the generator included
    assert bool(result.loss_finite) and torch.randn(3, device=device).isfinite().all()


def test_compile_is_auto_by_default_and_auto_compiles_long_cpu_runs_only():
    from pyrovae.compiled import AUTO_COMPILE_MIN_STEPS, faster_loss

    assert Config().train.compile == "auto"
    _, loss_fn, _ = _setup()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    long, short = AUTO_COMPILE_MIN_STEPS, AUTO_COMPILE_MIN_STEPS - 1
    for setting, device, steps, compiled in [("auto", cpu, long, True), ("auto", cpu, short, False),
                                             ("auto", cuda, long, False), (True, cpu, 1, True), (False, cpu, long, False)]:
        t = TINY.replace(train={"compile": setting}).train
        assert isinstance(faster_loss(t, loss_fn, device, steps), TracedLoss) == compiled, (setting, device, steps)
    for value in ("yes", 1, None):
        with pytest.raises(ConfigError, match="train.compile must be auto, true or false"):
            TINY.replace(train={"compile": value})


def test_a_compiled_run_keeps_its_compile_time_in_its_metrics(tmp_path):
    config = TINY.replace(train={"batch_size": 50, "max_steps": 2, "device": "cpu", "compile": True})
    run = train_run(config, tmp_path / "run", data=synthetic_data(200, 50), quiet=True)
    assert run.metrics["compile_seconds"] > 0
    eager = train_run(config.replace(train={"compile": False}), tmp_path / "eager", data=synthetic_data(200, 50),
                      quiet=True)
    assert eager.metrics["compile_seconds"] is None


def test_a_run_plans_its_steps_from_its_budget():
    from pyrovae.runs import _planned_steps

    data = synthetic_data(610, 50)  # 7 batches of 100 an epoch
    assert _planned_steps(TINY.replace(train={"batch_size": 100, "epochs": 20}), data) == 140
    assert _planned_steps(TINY.replace(train={"batch_size": 100, "epochs": 20, "max_steps": 9}), data) == 9


@pytest.mark.parametrize("objective,clip", [("meanfield", {}), ("manual_analytic", {}), ("iwae", {}),
                                            ("meanfield", {"grad_clip": 50.0, "skip_norm": 400.0}),
                                            ("meanfield stack", {}), ("iwae_dreg", {}), ("iwae_dreg stack", {})])
def test_the_whole_step_as_one_graph_trains_like_the_eager_step(objective, clip):
    """The whole step traced and compiled (the loss, its gradients, the guard; then torch's fused Adam
    on the graph's output) against the eager step from the same start, with the same noise: KL
    warm-up, a non-finite batch (skipped by both), clipping and the norm guard where set, a last
    batch of another size (eager) included. Losses, gradients, flags, parameters and Adam's state
    agree to float32 rounding; the first step of the fresh optimizer is eager and the rest are the graph's."""
    xs = _batches(6, bad=2)
    xs[5] = xs[5][:7]
    weights = [0.2, 0.6, 1.0, 1.0, 1.0, 1.0]
    runs = []
    for whole in (False, True):
        vae, loss_fn, optimizer = _setup(objective)
        lines = []
        traced = compile_loss(loss_fn, lines.append) if whole else None
        torch.manual_seed(5)
        steps = []
        with pyro.validation_enabled(False):
            for x, w in zip(xs, weights):
                result = traced.step(optimizer, x, w, **clip) if whole else train_step(loss_fn, optimizer, x,
                                                                                       kl_weight=w, **clip)
                steps.append((result, [p.grad.clone() for p in vae.parameters()]))
        assert not lines and (not whole or (traced.whole is not None and traced.graph is None))
        runs.append((steps, vae.state_dict(), optimizer.state_dict()["state"]))
    (eager, eager_params, eager_adam), (graph, graph_params, graph_adam) = runs
    assert [bool(r.loss_finite) for r, _ in eager] == [bool(r.loss_finite) for r, _ in graph] == \
        [True, True, False, True, True, True]
    for (a, grads_a), (b, grads_b) in zip(eager, graph):
        assert torch.equal(a.grads_finite, b.grads_finite) and torch.equal(a.too_large, b.too_large)
        if bool(a.loss_finite):
            torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-3)
            for ga, gb in zip(grads_a, grads_b):  # rounding relative to the gradient's own scale
                torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-4 * float(ga.abs().max()) + 1e-6)
    for name, value in eager_params.items():
        torch.testing.assert_close(graph_params[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for i, moments in eager_adam.items():
        for key, value in moments.items():
            torch.testing.assert_close(graph_adam[i][key], value, rtol=1e-4, atol=1e-4 * float(value.abs().max()),
                                       msg=f"{i} {key}")


def test_the_whole_step_takes_only_a_fused_adam_and_says_so_once():
    """Another optimizer: one line, and the step is train_step through the compiled loss."""
    vae, loss_fn, _ = _setup()
    optimizer = torch.optim.SGD(vae.parameters(), lr=1e-3)
    lines = []
    traced = compile_loss(loss_fn, lines.append)
    with pyro.validation_enabled(False):
        for x in _batches(3):
            assert bool(traced.step(optimizer, x).loss_finite)
    assert traced.whole is None and traced.graph is not None
    assert lines == ["note: train.compile: the whole step is traced for a fused Adam, not SGD; training with the "
                     "compiled loss"]


def test_a_compiled_run_resumes_exactly_and_trains_like_the_eager_run(tmp_path, monkeypatch):
    """``train.compile = true`` on the CPU (the whole step as one graph, as auto gives a long run):
    stopped inside epoch 2 by its step budget and resumed, it equals the straight compiled run bit
    for bit (a resumed run traces its graph again, from Adam's saved state); the learning rate
    halves after epoch 1 without a new graph; and the run is the eager run's to float32 rounding."""
    from helpers import assert_same_run

    from pyrovae.compiled import _WholeStep

    monkeypatch.setattr("pyrovae.runs.write_figures", lambda *a, **k: None)
    graph_steps, replay = [], _WholeStep.__call__
    monkeypatch.setattr(_WholeStep, "__call__", lambda self, *a: graph_steps.append(1) or replay(self, *a))
    data = synthetic_data(200, 50)  # 4 steps an epoch
    config = TINY.replace(train={"batch_size": 50, "epochs": 2, "device": "cpu", "compile": True, "lr_decay": 0.5,
                                 "lr_milestones": (1,), "kl_warmup_steps": 3})
    straight = train_run(config, tmp_path / "straight", data=data, quiet=True)
    assert len(graph_steps) == 7  # the first step makes Adam's state, eagerly
    partial = train_run(config.replace(train={"max_steps": 6}), tmp_path / "pieces", data=data, quiet=True).metrics
    assert partial["stopped_at_step"] == 6
    resumed = train_run(config, tmp_path / "pieces", data=data, quiet=True, resume=True).metrics
    assert_same_run(resumed, straight.metrics, tmp_path / "pieces", tmp_path / "straight")
    eager = train_run(config.replace(train={"compile": False}), tmp_path / "eager", data=data, quiet=True)
    for name, value in eager.vae.state_dict().items():
        torch.testing.assert_close(straight.vae.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert straight.metrics["compile_seconds"] > 0


def test_log1p_by_log_is_log1p_to_a_few_ulps_and_keeps_its_special_values():
    """Against float64 ``log1p``, over 2e5 values each side of zero from 1e-45 to 1e38 (and to -1):
    within 3 float32 units in the last place, and the same zeros, infinities and NaNs. Its
    derivative, taken directly, is 1/(1 + x) with no NaN where 1 + x rounds to 1."""
    x = torch.cat([torch.logspace(-45, 38, 200_000), -torch.logspace(-45, 0, 200_000)[:-1]])
    exact = torch.log1p(x.double())
    ulp = (torch.nextafter(exact.float(), torch.tensor(float("inf"))).double() - exact.float().double()).abs()
    error = (log1p_by_log(x).double() - exact).abs() / ulp
    assert float(error.max()) <= 3.0, float(error.max())
    special = torch.tensor([0.0, -0.0, -1.0, float("inf"), float("nan"), -2.0, float("-inf")])
    torch.testing.assert_close(log1p_by_log(special), torch.log1p(special), equal_nan=True, rtol=0, atol=0)
    assert torch.equal(torch.signbit(log1p_by_log(special[:2])), torch.tensor([False, True]))
    assert log1p_by_log(torch.arange(4)) is NotImplemented  # integers: the stock operator
    x = torch.tensor([0.0, 1e-30, -3e-8, 2e-7, 0.5, -0.5, 30.0], requires_grad=True)
    (grad,) = torch.autograd.grad(log1p_by_log(x).sum(), x)
    torch.testing.assert_close(grad, 1 / (1 + x.detach()), rtol=1e-6, atol=0)


def test_the_compiled_log1p_is_log1p():
    """``torch.log1p`` compiled by the project's backend (so through :func:`log1p_by_log` in C++)
    against the stock kernel: tiny values, where a compiler folding (x + 1) - 1 into x would return
    0, values near -1, large ones and the special values."""
    from pyrovae.compiled import inductor

    x = torch.tensor([1e-38, -1e-30, 3e-8, -6e-8, 1e-4, 0.3, -0.9999, 7.0, 1e30, 0.0, -0.0, -1.0, float("inf"),
                      float("nan"), -2.0] * 3)
    compiled = torch.compile(torch.log1p, backend=inductor, dynamic=False)
    torch.testing.assert_close(compiled(x), torch.log1p(x), rtol=3e-7, atol=0, equal_nan=True)


@pytest.mark.parametrize("whole", [False, True])
def test_the_compiled_cpu_step_calls_no_scalar_log1p(whole):
    """Inductor's CPU code evaluates ``log1p`` one value at a time, and softplus and the Bernoulli
    log-density both use it: the code compiled for a step (the whole step, or the loss with its
    backward pass) must hold none."""
    from torch._inductor.utils import run_and_get_code

    vae, loss_fn, optimizer = _setup()
    traced = compile_loss(loss_fn, print)
    x = _batches(1)[0]
    with pyro.validation_enabled(False):
        traced.step(optimizer, x)  # the fresh optimizer's first step is eager
        if whole:
            _, code = run_and_get_code(lambda: traced.step(optimizer, x))
        else:
            _, code = run_and_get_code(lambda: train_step(traced, optimizer, x))
    code = "\n".join(code)
    assert (traced.whole is not None) == whole
    assert "Vectorized<float>" in code and "log1p" not in code  # the kernels are there, and take no log1p


def test_the_compiler_probe_runs_once_in_the_background_and_compiling_waits_for_it(monkeypatch):
    """probe_compiler starts inductor's search of the CPU's vector instructions on a thread, once per
    process however often it is called; the backend joins that thread before it compiles."""
    import threading
    import torch._inductor.cpu_vec_isa as isa
    from pyrovae import compiled

    calls, release = [], threading.Event()

    def search():
        calls.append(threading.current_thread().name)
        release.wait(10)
        return []
    monkeypatch.setattr(compiled, "_PROBES", [])
    monkeypatch.setattr(compiled, "_listed_isas", lambda: [])
    monkeypatch.setattr(isa, "valid_vec_isa_list", search)
    compiled.probe_compiler()
    compiled.probe_compiler()
    assert len(compiled._PROBES) == 1 and compiled._PROBES[0].is_alive()
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", lambda graph, inputs, **kw: "compiled")
    threading.Timer(0.2, release.set).start()
    assert compiled.inductor(None, [torch.zeros(1)]) == "compiled"
    assert not compiled._PROBES[0].is_alive() and calls == ["inductor-vector-isa"]


def test_the_probe_tests_every_listed_instruction_set_at_once(monkeypatch):
    """Each instruction set the processor lists is tested on a thread of its own: two tests that
    each wait for the other finish only if they run side by side. Inductor's own search comes after
    them and finds their answers."""
    import threading
    import torch._inductor.cpu_vec_isa as isa
    from pyrovae import compiled

    both = threading.Barrier(2, timeout=10)
    met, order = [], []

    class Listed:
        def __bool__(self):
            met.append(both.wait())  # a BrokenBarrierError, and no entry, if tested one after another
            return True
    monkeypatch.setattr(compiled, "_PROBES", [])
    monkeypatch.setattr(compiled, "_listed_isas", lambda: [Listed(), Listed()])
    monkeypatch.setattr(isa, "valid_vec_isa_list", lambda: order.append(len(met)) or [])
    compiled.probe_compiler()
    compiled._PROBES[0].join(20)
    assert sorted(met) == [0, 1] and order == [2]


def test_a_traced_graph_compiles_once_for_its_first_inputs(monkeypatch):
    """compile_at_first_call hands the traced graph to the backend at the first call, with that
    call's inputs, and runs the compiled function for every call after it."""
    from pyrovae import compiled

    calls = []

    def backend(graph, inputs):
        calls.append((graph, [t.clone() for t in inputs]))
        return lambda *values: graph(*values) * 2
    monkeypatch.setattr(compiled, "inductor", backend)
    graph = torch.fx.symbolic_trace(lambda a, b: a + b)
    run = compiled.compile_at_first_call(graph)
    assert calls == [] and run.traced is graph
    a, b = torch.ones(3), torch.arange(3.0)
    assert torch.equal(run(a, b), 2 * (a + b)) and torch.equal(run(b, b), 4 * b)
    assert len(calls) == 1 and calls[0][0] is graph and torch.equal(calls[0][1][1], b)


def test_the_listed_instruction_sets_are_those_the_processor_names():
    """On x86 the candidates are inductor's, filtered by the processor's flags; elsewhere none."""
    import platform
    from torch._inductor import cpu_vec_isa
    from pyrovae.compiled import _listed_isas

    listed = _listed_isas()
    if platform.machine() not in ("x86_64", "AMD64"):
        assert listed == []
        return
    flags = cpu_vec_isa.x86_isa_checker()
    assert all(isa in cpu_vec_isa.supported_vec_isa_list for isa in listed)
    assert all(all(flag in flags for flag in str(isa).split()) for isa in listed)
    missing = [isa for isa in cpu_vec_isa.supported_vec_isa_list if isa not in listed]
    assert all(not all(flag in flags for flag in str(isa).split()) for isa in missing)
