"""Doubly reparameterized IWAE gradients (objective "iwae_dreg") against the IWAE gradient: the same
value and model gradients under the same noise, the same expected guide gradient, a smaller spread."""

import pyro
import pytest
import torch

from pyrovae import ModelConfig, build_vae
from pyrovae.objectives import build_objective

SHAPE = (1, 4, 4)


def _vae(latents=(), inference="top_down", seed=0):
    torch.manual_seed(seed)
    fields = {"latents": latents, "latent_hidden": (6,), "inference": inference} if latents else {"z_dim": 3}
    return build_vae(ModelConfig(hidden=(8,), **fields), SHAPE)


def _image(seed=1):
    return torch.bernoulli(torch.full((1, *SHAPE), 0.4), generator=torch.Generator().manual_seed(seed))


def _grads(vae, name, x, k, seed):
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    loss = build_objective(name, vae, k)(x, kl_weight=1.0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}


def _guide_names(vae):
    return {n for n, _ in vae.named_parameters() if n.startswith("posterior.")}


@pytest.mark.parametrize("latents, inference", [((), "top_down"), ((3, 2), "top_down"), ((3, 2), "bottom_up")])
def test_same_value_and_model_gradients_as_iwae_under_the_same_noise(latents, inference):
    vae, x = _vae(latents, inference), _image().expand(6, *SHAPE)
    iwae, dreg = _grads(vae, "iwae", x, 5, 3), _grads(vae, "iwae_dreg", x, 5, 3)
    torch.testing.assert_close(dreg[0], iwae[0], rtol=1e-6, atol=1e-5)
    model_only = [n for n in iwae[1] if n.startswith("decoder.") or (inference == "bottom_up" and "conditionals" in n)]
    assert model_only
    for name in model_only:  # parameters only the model uses: the IWAE gradient, draw by draw
        torch.testing.assert_close(dreg[1][name], iwae[1][name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.allclose(dreg[1][n], iwae[1][n]) for n in _guide_names(vae))  # and a different guide one


def _gradient_draws(vae, name, k, copies, chunks, image=None):
    """``chunks`` independent means of the guide's gradient, each over ``copies`` draws for one image."""
    x = (_image() if image is None else image).expand(copies, *SHAPE)
    names = sorted(_guide_names(vae))
    means = []
    for chunk in range(chunks):
        grads = _grads(vae, name, x, k, 100 + chunk)[1]
        means.append(torch.cat([grads[n].flatten() for n in names]) / copies)
    return torch.stack(means)  # (chunks, parameters)


@pytest.mark.parametrize("latents", [(), (3, 2)])
def test_the_expected_guide_gradient_is_the_iwae_gradient(latents):
    """Means of 20 x 400 draws each: every coordinate agrees within 5 standard errors of the difference."""
    vae = _vae(latents)
    iwae, dreg = _gradient_draws(vae, "iwae", 10, 400, 20), _gradient_draws(vae, "iwae_dreg", 10, 400, 20)
    error = (iwae.var(0) / 20 + dreg.var(0) / 20).sqrt()
    gap = (iwae.mean(0) - dreg.mean(0)).abs()
    assert bool((gap <= 5 * error + 1e-6).all()), (gap / error).max()
    assert iwae.mean(0).abs().max() > 10 * error.max()  # the gradient is resolved: the check has teeth


def _fitted_vae(steps=300):
    """The tiny VAE fitted (ELBO, Adam) to 64 noisy copies of 4 random patterns: it uses its latent
    code (a KL of about 1.7 nats), and its guide is near its posterior, DReG's regime."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.bernoulli(torch.full((4, *SHAPE), 0.5), generator=g)
    data = (patterns.repeat(16, 1, 1, 1) + torch.bernoulli(torch.full((64, *SHAPE), 0.05), generator=g)) % 2
    vae = _vae()
    optimizer = torch.optim.Adam(vae.parameters(), 1e-2)
    loss_fn = build_objective("meanfield", vae)
    pyro.set_rng_seed(0)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(data).backward()
        optimizer.step()
    return vae, data[:1]


def test_doubly_reparameterized_gradients_have_a_smaller_spread(capsys):
    """Single draws of K = 50 particles for one image: the guide's gradient varies less. (At the
    random initialization, where q is far from the posterior and one particle takes nearly all the
    weight, DReG's spread was 0.18x to 0.12x IWAE's instead: its advantage is near the optimum.)"""
    vae, x = _fitted_vae()
    spreads = {}
    for name in ("iwae", "iwae_dreg"):
        draws = _gradient_draws(vae, name, 50, 1, 100, x)  # (100, parameters): single draws
        spreads[name] = draws.var(0).sum().item()
    ratio = spreads["iwae"] / spreads["iwae_dreg"]
    with capsys.disabled():
        print(f"\nguide-gradient variance, IWAE / DReG at K=50 (summed over the guide's parameters): {ratio:.1f}x")
    assert ratio > 2


def test_compiled_dreg_keeps_its_loss_alone_eager_and_says_so_once():
    """A trace of the loss alone would carry IWAE's gradient, not DReG's (the rescaling lives in the
    backward pass): compiled, the loss called on its own is the eager objective's, value and
    gradients bit for bit, with one line saying why. The whole step is traced instead
    (tests/test_compiled.py)."""
    from pyrovae.compiled import TracedLoss, faster_loss
    from pyrovae.config import TrainConfig

    vae, x = _vae(), _image().expand(6, *SHAPE)
    lines = []
    compiled = faster_loss(TrainConfig(compile=True), build_objective("iwae_dreg", vae, 5), torch.device("cpu"), 10,
                           lines.append)
    assert isinstance(compiled, TracedLoss)
    eager = _grads(vae, "iwae_dreg", x, 5, 3)
    for _ in range(2):
        vae.zero_grad(set_to_none=True)
        pyro.set_rng_seed(3)
        loss = compiled(x, kl_weight=1.0)
        loss.backward()
        assert torch.equal(loss.detach(), eager[0])
        assert all(torch.equal(p.grad, eager[1][n]) for n, p in vae.named_parameters() if p.grad is not None)
    assert compiled.graph is None and len(lines) == 1
    assert "only a trace of the whole step sees" in lines[0] and "the loss alone stays eager" in lines[0]


def test_a_cuda_graph_leaves_dreg_eager_through_any_wrapper():
    """The CUDA-graph step is not taken for DReG, however the objective is wrapped (compiled, then
    wrapped again as DDP wraps it): one line says why. Only the device's type is read here."""
    from types import SimpleNamespace

    from pyrovae.compiled import TracedLoss
    from pyrovae.config import TrainConfig
    from pyrovae.engine import _Stepper
    from pyrovae.matmul import OneDNNLoss

    dreg = build_objective("iwae_dreg", _vae(), 5)
    for loss_fn in (dreg, TracedLoss(dreg, log=lambda line: None), OneDNNLoss(dreg),
                    SimpleNamespace(module=TracedLoss(OneDNNLoss(dreg), log=lambda line: None))):
        if isinstance(loss_fn, SimpleNamespace):
            assert loss_fn.module.alone == dreg.whole_step_only  # the compiled wrapper sees it through oneDNN's
        lines = []
        stepper = _Stepper(TrainConfig(cuda_graph=True), loss_fn, None, 6, torch.device("cuda"), lines.append)
        assert not stepper.graph and len(lines) == 1 and "not captured yet" in lines[0], lines
    lines = []
    assert _Stepper(TrainConfig(cuda_graph=True), build_objective("iwae", _vae(), 5), None, 6,
                    torch.device("cuda"), lines.append).graph and not lines
