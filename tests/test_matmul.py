"""The linear layers' oneDNN route against torch's own product, and how a run chooses its backend."""

import warnings

import pyro
import pytest
import torch
import torch.nn.functional as F

from helpers import synthetic_data
from pyrovae import Config, build_vae
from pyrovae.checkpoint import load_checkpoint
from pyrovae.compiled import TracedLoss, compile_loss
from pyrovae.config import ConfigError, ModelConfig
from pyrovae.engine import make_optimizer, train_step
from pyrovae.matmul import OneDNNLoss, choose, measure, onednn_available, onednn_linear
from pyrovae.objectives import build_objective
from pyrovae.runs import train_run

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")

TINY = Config().replace(model={"z_dim": 4, "hidden": (32,)})
CPU = torch.device("cpu")


@pytest.mark.parametrize("shape", [(9, 5), (3, 9, 5)], ids=["rows", "particles x rows"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_the_onednn_product_and_its_gradients_are_torchs_to_rounding(shape, bias):
    """Forward, and the gradients for x, W and b, against F.linear's; and torch's own checks of a
    custom operator (schema, shape-only implementation, autograd registration)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, requires_grad=True)
    w = torch.randn(4, 5, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True) if bias else None
    with warnings.catch_warnings():  # opcheck's own autograd check reads .grad of a non-leaf copy
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        torch.library.opcheck(onednn_linear, (x, w, b))
    inputs = [t for t in (x, w, b) if t is not None]
    y, y_ref = onednn_linear(x, w, b), F.linear(x, w, b)
    dy = torch.randn(y.shape, generator=g)
    for got, want in zip((y, *torch.autograd.grad(y, inputs, dy)), (y_ref, *torch.autograd.grad(y_ref, inputs, dy))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_gradient_that_is_not_needed_is_not_computed():
    """The data's gradient (the first layer's input) is never asked for: that product is skipped."""
    x, w = torch.randn(6, 5), torch.randn(4, 5, requires_grad=True)
    (gw,) = torch.autograd.grad(onednn_linear(x, w).sum(), [w])
    torch.testing.assert_close(gw, torch.ones(6, 4).t() @ x)


def _setup(objective, model=TINY.model, seed=0):
    torch.manual_seed(seed)
    vae = build_vae(model)
    return vae, build_objective(objective, vae, 3)


def _batch(n=16, seed=1):
    return torch.bernoulli(torch.full((n, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("objective", ["meanfield", "elbo", "manual_analytic", "iwae", "iwae_dreg"])
def test_a_loss_through_onednn_is_the_loss_through_blas(objective):
    """The same loss and gradients under the same noise, to float32 rounding, objectives whose
    decoder sees particles x batch rows and DReG's rescaled gradients included."""
    vae, loss_fn = _setup(objective)
    x, results = _batch(), []
    for fn in (loss_fn, OneDNNLoss(loss_fn)):
        torch.manual_seed(3)
        with pyro.validation_enabled(False):
            loss = fn(x, kl_weight=0.5)
        results.append((loss.detach(), torch.autograd.grad(loss, list(vae.parameters()), allow_unused=True)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * (1 + float(a.abs().max())))  # float32 rounding


def test_a_stack_of_latents_trains_through_onednn_and_compiles_as_one_graph():
    """A two-layer stack under IWAE, traced and compiled with its products through oneDNN: the graph
    holds the operator (no eager fallback), and steps under a KL warm-up, a non-finite batch (which
    both skip) included, agree with the eager BLAS steps."""
    model = ModelConfig(latents=(6, 3), hidden=(24,), latent_hidden=(12,))
    xs = [_batch(16, seed) for seed in range(4)]
    xs[2][0, 0, 0, 0] = float("nan")
    runs = []
    for onednn in (False, True):
        vae, loss_fn = _setup("iwae", model)
        optimizer, lines = make_optimizer(vae.parameters(), 1e-3, CPU), []
        fn = compile_loss(OneDNNLoss(loss_fn), lines.append) if onednn else loss_fn
        torch.manual_seed(5)
        with pyro.validation_enabled(False):
            steps = [train_step(fn, optimizer, x, kl_weight=w) for x, w in zip(xs, (0.25, 0.5, 0.75, 1.0))]
        assert [bool(s.loss_finite) for s in steps] == [True, True, False, True] and not lines
        losses = [s.loss for s in steps if s.loss_finite]
        if onednn:
            assert any("onednn_linear" in str(n.target) for n in _traced_graph(fn).graph.nodes)
        runs.append((losses, vae.state_dict()))
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-3)
    for name, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], value, rtol=1e-4, atol=1e-5)


def _traced_graph(traced: TracedLoss):
    """The fx graph ``traced`` compiled (its compiler's input)."""
    graph = traced.graph
    return getattr(graph, "traced", graph)


def test_measuring_leaves_the_run_as_it_was():
    """The timing passes leave the random streams, the gradients and the buffers untouched, and
    give a positive time for each route."""
    vae, loss_fn = _setup("meanfield")
    vae.register_buffer("counter", torch.zeros(3))
    rng = torch.get_rng_state()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    seconds = measure(loss_fn, _batch(), rounds=2, passes=1)
    assert set(seconds) == {"blas", "onednn"} and all(s > 0 for s in seconds.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in vae.parameters())
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)

    def forward(self, x, kl_weight=1.0):
        return self.conv(x).sum()


def test_how_the_backend_is_chosen(monkeypatch):
    """blas and onednn choose outright; auto measures a long CPU run only, and keeps oneDNN only where
    it is clearly faster; a resumed run keeps its checkpoint's; CUDA and models without linear
    layers keep the default, and onednn asked for on CUDA says it does not apply."""
    _, loss_fn = _setup("meanfield")
    batches = []

    def batch():
        batches.append(1)
        return _batch()
    lines = []
    pick = lambda setting, **kw: choose(setting, kw.pop("fn", loss_fn), kw.pop("device", CPU), batch,  # noqa: E731
                                        steps=kw.pop("steps", 5000), log=lines.append, **kw)
    assert pick("blas") == {"backend": "blas", "by": "train.matmul"}
    assert pick("onednn") == {"backend": "onednn", "by": "train.matmul"}
    assert pick("auto", steps=100).backend == "blas" and not batches
    assert pick("auto", resumed="onednn") == {"backend": "onednn", "by": "the checkpoint"}
    assert pick("auto", fn=_Conv()).backend == "blas"
    assert not lines and not batches
    assert pick("onednn", device=torch.device("cuda")).backend == "blas"
    assert len(lines) == 1 and "CPU only" in lines[0]
    for onednn, blas, expected in ((0.5, 1.0, "onednn"), (0.99, 1.0, "blas"), (1.2, 1.0, "blas")):
        monkeypatch.setattr("pyrovae.matmul.measure", lambda fn, x, o=onednn, b=blas: {"blas": b, "onednn": o})
        chosen = pick("auto")
        assert chosen.backend == expected and chosen["by"] == "measured" and chosen["seconds"]["onednn"] == onednn
    assert len(batches) == 3 and "matrix products: blas" in lines[-1]


def test_train_matmul_takes_only_auto_blas_or_onednn():
    assert Config().train.matmul == "auto"
    with pytest.raises(ConfigError, match="train.matmul must be one of auto, blas, onednn"):
        Config().replace(train={"matmul": "mkl"})


def test_a_run_records_its_backend_and_resumes_with_it_exactly(tmp_path):
    """metrics.json and the checkpoint say which backend trained the run; a run stopped part-way and
    resumed keeps the checkpoint's backend and ends where the run trained straight through does."""
    data = synthetic_data(200, 50)
    config = TINY.replace(train={"matmul": "onednn", "batch_size": 50, "epochs": 2, "compile": False})
    whole = train_run(config, tmp_path / "whole", data=data, quiet=True)
    assert whole.metrics["matmul"] == {"backend": "onednn", "by": "train.matmul"}
    assert load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["state"]["matmul"] == "onednn"
    train_run(config.replace(train={"max_steps": 6}), tmp_path / "pieces", data=data, quiet=True)
    resumed = train_run(config, tmp_path / "pieces", data=data, quiet=True, resume=True)
    assert resumed.metrics["matmul"] == {"backend": "onednn", "by": "the checkpoint"}
    for name, value in whole.vae.state_dict().items():
        assert torch.equal(value, resumed.vae.state_dict()[name]), name
