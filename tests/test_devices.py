"""Every device present: the parts, the objectives, training, resume, evaluation, sampling, figures and
loading, on the CPU and, where a GPU is present, on CUDA (the ``device`` fixture; the CUDA cases carry
the ``cuda`` marker and ``pytest -m cuda`` runs exactly them).

The oracles: every tensor a computation returns, and every gradient, is on the device it ran on and
finite; a run stopped and resumed on a device equals the straight run there bit for bit; figures
computed on CUDA equal those computed on the CPU from the same draws, to float32 rounding. Shapes are
tiny (8x8 images, a 2- or 3-dimensional code, 16 hidden units), so the CPU cases stay fast.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings

import pyro
import pytest
import torch
from pyro import poutine

import pyrovae
import pyrovae.runs
from helpers import (ROOT, assert_same_run, binary_images, data_of_kind, host_reads_of_steps, prepared_on,
                     small_options, synthetic_data)
from pyrovae import Config, ModelConfig, build_vae, train_step
from pyrovae.checkpoint import save_checkpoint
from pyrovae.engine import make_optimizer, resolve_device
from pyrovae.evaluate import active_units, evaluate, importance_log_likelihood, seeded_noise
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.networks import NETWORKS
from pyrovae.objectives import OBJECTIVES, build_objective
from pyrovae.posteriors import POSTERIORS
from pyrovae.priors import PRIORS
from pyrovae.runs import train_run, write_figures

SHAPE = (1, 8, 8)
TINY = ModelConfig(z_dim=3, hidden=(16,), network="mlp")
#: Options that keep each network tiny on 8x8 images (one halving, four channels).
SMALL_NETWORKS = {"conv": {"channels": (4,)}, "resnet": {"width": 4, "blocks": 1}}
#: Likelihood options with device-relevant state of their own: a fixed scale held in a buffer, a scale
#: predicted per pixel (a second decoder output), a mixture of discretized logistics.
LIKELIHOOD_VARIANTS = [("normal", {"scale": "fixed"}), ("normal", {"scale": "per_pixel"}),
                       ("discretized_logistic", {"components": 2})]
#: What a run with a 2-dimensional code writes, figures included.
RUN_FILES = ("config.json", "metrics.json", "checkpoint.pt", "loss_curve.png", "reconstructions.png",
             "samples.png", "manifold.png", "latent_scatter.png")
#: The priors every posterior is paired with: the standard one, the VampPrior (which runs the posterior
#: at its pseudo-inputs: with an IAF guide, a mixture of flows) and the spline-flow prior.
PRIORS_WITH_EACH_POSTERIOR = ("normal", "vamp", "flow")


def _part_cases() -> list:
    """Every prior (with the diagonal posterior), every posterior with the priors above, every
    likelihood and the variants above, every network."""
    pairs = [(prior, "diagonal") for prior in sorted(PRIORS)]
    pairs += [(prior, posterior) for posterior in sorted(POSTERIORS) for prior in PRIORS_WITH_EACH_POSTERIOR
              if posterior != "diagonal" and prior in PRIORS]
    cases = [pytest.param({"prior": prior, "prior_options": small_options(PRIORS[prior]), "posterior": posterior},
                          id=f"prior={prior}-posterior={posterior}") for prior, posterior in pairs]
    cases += [pytest.param({"likelihood": name}, id=f"likelihood={name}") for name in sorted(LIKELIHOODS)]
    cases += [pytest.param({"likelihood": name, "likelihood_options": options},
                           id=f"likelihood={name}-{'-'.join(map(str, options.values()))}")
              for name, options in LIKELIHOOD_VARIANTS if name in LIKELIHOODS]
    cases += [pytest.param({"network": name, "network_options": SMALL_NETWORKS.get(name, {})}, id=f"network={name}")
              for name in sorted(NETWORKS)]
    return cases


def _on(device: torch.device, *tensors) -> bool:
    """Whether every tensor lives on ``device`` (by type: ``cuda`` and ``cuda:0`` are the same GPU here)."""
    return all(t.device.type == device.type for t in tensors)


def _tiny_vae(device: torch.device, seed: int = 0, **parts) -> pyrovae.VAE:
    """``TINY`` with some parts replaced, initialized from ``seed`` on the CPU and moved to ``device``:
    the same seed gives the same model on every device."""
    torch.manual_seed(seed)
    return build_vae(dataclasses.replace(TINY, **parts), SHAPE).to(device)


def _run_config(device: torch.device, **model) -> Config:
    """A one-epoch run of 4 steps (64 images, batch 16) with a 2-dimensional code, on ``device``."""
    return Config().replace(model={"z_dim": 2, "hidden": (16,), **model},
                            train={"epochs": 1, "batch_size": 16, "device": device.type})


def _run_data(device: torch.device):
    """64 training and 32 test images of 8x8 binary pixels, held on ``device``."""
    return prepared_on(synthetic_data(n_train=64, n_test=32, shape=SHAPE), device)


# --- the parts, the model and every objective ----------------------------------------------------
@pytest.mark.parametrize("parts", _part_cases())
def test_every_part_samples_and_scores_with_every_objective_on_the_device(device, parts):
    """Moved with ``.to(device)``, every state tensor is there; draws from the prior, E[x|z] and the
    generative model's images come out there; every objective gives a finite loss there, with finite
    gradients there, under a KL weight."""
    vae = _tiny_vae(device, **parts)
    assert _on(device, *vae.state_dict().values()), "a parameter or buffer stayed behind"
    z = vae.prior().sample((5,))
    assert _on(device, z) and z.shape == (5, TINY.z_dim) and torch.isfinite(z).all()
    means = vae.sample(5)
    assert _on(device, means) and means.shape == (5, *SHAPE) and torch.isfinite(means).all()
    drawn = poutine.trace(vae.model).get_trace(batch_size=4).nodes["x"]["value"]  # x ~ p(x|z), z ~ p(z)
    assert _on(device, drawn) and drawn.shape == (4, *SHAPE)

    x = data_of_kind(vae.likelihood.data_kind, n=6, shape=SHAPE).to(device)
    assert _on(device, vae.reconstruct(x))
    for name in sorted(OBJECTIVES):
        loss_fn = build_objective(*name[:1], vae, particles=2, implementation=name[1])
        vae.zero_grad(set_to_none=True)
        loss = loss_fn(x, kl_weight=0.5)
        assert _on(device, loss) and loss.shape == () and torch.isfinite(loss), f"{name}: {loss}"
        loss.backward()
        grads = {n: p.grad for n, p in vae.named_parameters() if p.grad is not None}
        assert grads, f"{name}: no gradient"
        elsewhere = [n for n, g in grads.items() if not _on(device, g)]
        assert not elsewhere, f"{name}: gradients on another device: {elsewhere}"
        assert all(torch.isfinite(g).all() for g in grads.values()), f"{name}: a gradient is not finite"


def test_sampling_on_the_device_repeats_under_a_seed_and_leaves_the_callers_stream(device):
    """``vae.sample`` under ``seeded_noise`` (as the figures draw) gives the same images twice, on the
    device, and the caller's own stream there goes on as if nothing had been drawn."""
    vae = _tiny_vae(device, prior="flow")
    with seeded_noise(3, device):
        first = vae.sample(6)
    torch.manual_seed(1)
    with seeded_noise(3, device):
        again = vae.sample(6)
    after = torch.randn(4, device=device)
    torch.manual_seed(1)
    expected = torch.randn(4, device=device)
    assert _on(device, first) and torch.equal(first, again)
    assert ((first >= 0) & (first <= 1)).all()  # Bernoulli means
    assert torch.equal(after, expected)


# --- training, resume, loading ---------------------------------------------------------------------
def _without_figures(monkeypatch) -> None:
    """Runs skip their pictures (most of a tiny run's time); the tests that check pictures keep them."""
    monkeypatch.setattr(pyrovae.runs, "write_figures", lambda *args, **kwargs: None)


@pytest.mark.parametrize("model,objective,figures", [
    pytest.param({}, "meanfield", True, id="default"),
    pytest.param({"prior": "flow", "posterior": "iaf"}, "elbo", False, id="flow-prior-iaf-posterior"),
    pytest.param({"prior": "vamp", "prior_options": {"components": 3}}, "iwae", False, id="vamp-iwae"),
])
def test_train_run_trains_on_the_device(device, tmp_path, monkeypatch, model, objective, figures):
    """``train_run`` on data held on the device: four steps, finite figures, a model that stays there
    and moved from its initial values, every output file (with the default model: every picture, the
    2-D latent ones too), and a saved run that ``pyrovae.load`` puts back on the device unchanged."""
    if not figures:
        _without_figures(monkeypatch)
    config = _run_config(device, **model).replace(train={"objective": objective, "particles": 2})
    pyro.set_rng_seed(config.train.seed)
    initial = build_vae(config.model, SHAPE).state_dict()  # the run builds its model from the same seed
    run = train_run(config, tmp_path / "run", data=_run_data(device), quiet=True)
    [row] = run.metrics["epochs"]
    assert row["steps"] == 4 and run.metrics["device"] == str(device)
    assert all(math.isfinite(row[k]) for k in ("train_neg_elbo", "test_neg_elbo", "test_reconstruction", "test_kl"))
    trained = run.vae.state_dict()
    assert _on(device, *trained.values())
    unchanged = [n for n, _ in run.vae.named_parameters() if torch.equal(trained[n].cpu(), initial[n])]
    assert not unchanged, f"training left these parameters as they were: {unchanged}"
    for name in RUN_FILES if figures else RUN_FILES[:3]:
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    loaded = pyrovae.load(tmp_path / "run", map_location=device)
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())


def test_a_run_stopped_by_its_step_budget_resumes_exactly_on_the_device(device, tmp_path, monkeypatch):
    """Two epochs of 4 steps straight, against a run stopped after step 6 (inside epoch 2) and resumed:
    the same figures, parameters and Adam moments, bit for bit (the device's noise and data streams
    are saved and restored)."""
    _without_figures(monkeypatch)
    data = _run_data(device)
    config = _run_config(device).replace(train={"epochs": 2})
    straight = train_run(config, tmp_path / "straight", data=data, quiet=True).metrics
    partial = train_run(config.replace(train={"max_steps": 6}), tmp_path / "pieces", data=data, quiet=True).metrics
    assert partial["stopped_at_step"] == 6 and len(partial["epochs"]) == 1
    resumed = train_run(config, tmp_path / "pieces", data=data, quiet=True, resume=True).metrics
    assert_same_run(resumed, straight, tmp_path / "pieces", tmp_path / "straight")


def test_a_checkpoint_loads_onto_the_device_and_back_to_the_cpu(device, tmp_path):
    """A checkpoint saved from the device loads, with ``map_location``, onto each device present: every
    parameter and buffer (the flows' orders of coordinates too) is there and equal to the saved one,
    and the loaded model encodes as the saved one does. ``pyrovae.load`` alone gives the CPU."""
    config = Config().replace(model={"z_dim": 3, "hidden": (16,), "prior": "flow", "posterior": "iaf"})
    vae = _tiny_vae(device, prior="flow", posterior="iaf")
    save_checkpoint(tmp_path / "checkpoint.pt", vae=vae, optimizer=None, config=config, state={})
    x = binary_images(4, SHAPE)
    expected = vae.encode(x.to(device)).cpu()
    saved = {k: v.cpu() for k, v in vae.state_dict().items()}
    assert _on(torch.device("cpu"), *pyrovae.load(tmp_path).state_dict().values())
    for target in {torch.device("cpu"), device}:
        loaded = pyrovae.load(tmp_path, map_location=target)
        state = loaded.state_dict()
        assert _on(target, *state.values()) and state.keys() == saved.keys()
        assert all(torch.equal(v.cpu(), saved[k]) for k, v in state.items())
        torch.testing.assert_close(loaded.encode(x.to(target)).cpu(), expected, rtol=1e-4, atol=1e-5)


# --- evaluation and figures ---------------------------------------------------------------------
def _normal_draws_from_the_cpu(monkeypatch) -> None:
    """Make torch's Normal draw its N(0, 1) noise from the CPU generator, on every device, and ``sample``
    go through ``rsample``: a computation on CUDA then sees the very draws of the same computation on
    the CPU, and their figures can be compared."""
    monkeypatch.setattr(torch.distributions.normal, "_standard_normal",
                        lambda shape, dtype, device: torch.randn(shape, dtype=dtype).to(device))
    monkeypatch.setattr(torch.distributions.Normal, "sample",
                        lambda self, sample_shape=torch.Size(): self.rsample(sample_shape).detach())


def _test_figures(vae, images) -> dict[str, float]:
    """The test figures a run reports: -ELBO and its terms, IWAE-8 and its ELBO, active-unit variances."""
    figures = {f"elbo {k}": v for k, v in evaluate(vae, images, batch_size=16).items() if k != "images"}
    iwae = importance_log_likelihood(vae, images, k=8, batch_size=16, max_rows=64)
    figures.update({f"iwae {k}": v for k, v in iwae.items() if k not in ("images", "k")})
    figures.update({f"variance {i}": v for i, v in enumerate(active_units(vae, images)["variances"])})
    return figures


@pytest.mark.parametrize("parts", [
    pytest.param({}, id="default"),
    pytest.param({"prior": "flow", "posterior": "iaf"}, id="flow-prior-iaf-posterior"),
    pytest.param({"prior": "vamp", "prior_options": {"components": 3}}, id="vamp"),
    pytest.param({"prior": "vamp", "prior_options": {"components": 3}, "posterior": "iaf"}, id="vamp-iaf"),
])
def test_evaluation_on_the_device_matches_the_cpu(device, parts, monkeypatch):
    """``evaluate``, ``importance_log_likelihood`` and ``active_units`` on the device give finite figures;
    on a GPU they equal the CPU's from the same draws to float32 rounding (rel 1e-4; the CPU takes its
    fast routes, the GPU the stock ops)."""
    _normal_draws_from_the_cpu(monkeypatch)
    test = synthetic_data(n_train=1, n_test=32, shape=SHAPE).test
    here = _test_figures(_tiny_vae(device, **parts), test.to(device))
    assert all(math.isfinite(v) for v in here.values()), here
    if device.type != "cpu":
        on_cpu = _test_figures(_tiny_vae(torch.device("cpu"), **parts), test)  # the same seed: the same model
        assert here == pytest.approx(on_cpu, rel=1e-4, abs=1e-6)


def test_figures_from_tensors_on_the_device(device, tmp_path):
    """``write_figures`` takes a model, test images and labels all on the device (labels on the CPU, as
    a run keeps them, are covered by the default run above) and writes every picture, the 2-D latent
    ones included."""
    vae = _tiny_vae(device, z_dim=2)
    data = _run_data(device)
    history = [{"epoch": 1, "train_neg_elbo": 50.0, "test_neg_elbo": 48.0}]
    write_figures(vae, tmp_path, history, data.test, data.test_labels.to(device), seed=0)
    for name in ("loss_curve.png", "reconstructions.png", "samples.png", "manifold.png", "latent_scatter.png"):
        assert (tmp_path / name).stat().st_size > 0, name


# --- the step: on-device guard, no host reads -------------------------------------------------------
def test_a_non_finite_step_is_skipped_on_the_device(device):
    """A NaN pixel gives a NaN loss: the fused Adam kernel, told so by a flag on the device, leaves
    every parameter and moment (and the step count) exactly as they were."""
    vae = _tiny_vae(device, likelihood="normal", likelihood_options={"scale": "fixed"})
    loss_fn = build_objective("meanfield", vae)
    optimizer = make_optimizer(vae.parameters(), 1e-2, device)
    assert optimizer.defaults["fused"]
    x = torch.rand(8, *SHAPE, device=device)
    with pyro.validation_enabled(False):
        train_step(loss_fn, optimizer, x)
        params = {k: v.clone() for k, v in vae.state_dict().items()}
        moments = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        result = train_step(loss_fn, optimizer, bad)
    assert _on(device, result.loss, result.loss_finite, result.grads_finite)
    assert not bool(result.loss_finite & result.grads_finite.all())
    assert all(torch.equal(params[k], v) for k, v in vae.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(moments[i][k], after[i][k]) for i in after for k in after[i])


@pytest.mark.parametrize("objective", ["meanfield", "elbo", "manual_analytic", "manual_iwae"])
def test_a_step_reads_nothing_back_from_the_device(device, objective, monkeypatch):
    """Loss, backward and the guarded optimizer step, with a KL weight and clipping: no tensor method
    that copies a value to the host is called."""
    vae = _tiny_vae(device)
    loss_fn = build_objective(objective, vae, particles=2)
    optimizer = make_optimizer(vae.parameters(), 1e-3, device)
    assert host_reads_of_steps(loss_fn, optimizer, binary_images(6, SHAPE).to(device), monkeypatch) == []


# --- only on a GPU -------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("objective", ["meanfield", "elbo", "manual_analytic"])
def test_a_cuda_step_makes_no_synchronizing_call(objective):
    """CUDA's own sync check (``torch.cuda.set_sync_debug_mode("error")``) sees no synchronizing call
    (a copy to the host, ``nonzero``, a stream sync) in a training step after the first."""
    device = torch.device("cuda")
    x = binary_images(6, SHAPE).to(device)
    with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):  # as in train_run
        vae = _tiny_vae(device)
        loss_fn = build_objective(objective, vae)
        optimizer = make_optimizer(vae.parameters(), 1e-3, device)
        train_step(loss_fn, optimizer, x)  # the first step creates the optimizer state (copies to the GPU)
        torch.cuda.synchronize()
        try:
            with warnings.catch_warnings():  # torch warns that the mode is a prototype; the suite errors on warnings
                warnings.simplefilter("ignore", UserWarning)
                torch.cuda.set_sync_debug_mode("error")
            for _ in range(3):
                train_step(loss_fn, optimizer, x, kl_weight=0.5, grad_clip=10.0)
        finally:  # the mode is the process's: left on, it would fail every later test
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_device_auto_trains_on_the_gpu_and_the_run_names_it(tmp_path, monkeypatch):
    """``train.device = "auto"`` picks the GPU, and metrics.json says which device and which GPU."""
    _without_figures(monkeypatch)
    assert resolve_device("auto").type == "cuda"
    config = _run_config(torch.device("cuda")).replace(train={"device": "auto"})
    run = train_run(config, tmp_path / "run", data=_run_data(torch.device("cuda")), quiet=True)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["device"] == "cuda" and saved["machine"]["gpu"] == torch.cuda.get_device_name()
    assert _on(torch.device("cuda"), *run.vae.parameters())


@pytest.mark.cuda
def test_a_gpu_run_loads_in_a_process_that_sees_no_gpu(tmp_path, monkeypatch):
    """A run trained on CUDA loads with ``pyrovae.load`` in a process with no visible GPU (the CPU by
    default) and decodes as the trained model does."""
    _without_figures(monkeypatch)
    device = torch.device("cuda")
    run = train_run(_run_config(device), tmp_path / "run", data=_run_data(device), quiet=True)
    z = torch.randn(5, 2)
    torch.save(z, tmp_path / "z.pt")
    script = ("import json, sys, torch, pyrovae\n"
              "assert not torch.cuda.is_available()\n"
              "vae = pyrovae.load(sys.argv[1])\n"
              "print(json.dumps(vae.decode(torch.load(sys.argv[2])).tolist()))\n")
    result = _without_a_gpu(script, tmp_path / "run", tmp_path / "z.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    decoded = torch.tensor(json.loads(result.stdout))
    torch.testing.assert_close(decoded, run.vae.decode(z.to(device)).cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_a_gpu_run_with_device_auto_resumes_where_there_is_no_gpu(tmp_path, monkeypatch):
    """A run with ``train.device = "auto"``, stopped on a GPU inside epoch 2, goes on to its end in a
    process that sees no GPU (the same images in the same order; not bit for bit, since the noise
    and the binarization come from another kind of generator there)."""
    _without_figures(monkeypatch)
    device = torch.device("cuda")
    config = _run_config(device).replace(train={"device": "auto", "epochs": 2, "max_steps": 6})
    train_run(config, tmp_path / "run", data=_run_data(device), quiet=True)
    script = ("import json, sys, torch\n"
              "sys.path.insert(0, 'tests')\n"
              "from helpers import synthetic_data\n"
              "from pyrovae import Config\n"
              "from pyrovae.runs import train_run\n"
              "assert not torch.cuda.is_available()\n"
              "config = Config.load(sys.argv[1] + '/config.json').replace(train={'max_steps': None})\n"
              f"data = synthetic_data(n_train=64, n_test=32, shape={SHAPE})\n"
              "run = train_run(config, sys.argv[1], data=data, quiet=True, resume=True)\n"
              "print(json.dumps(run.metrics['epochs']))\n")
    result = _without_a_gpu(script, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads(result.stdout.splitlines()[-1])) == 2


def _without_a_gpu(script: str, *args) -> subprocess.CompletedProcess:
    """Run a Python script in a process that sees no GPU (``CUDA_VISIBLE_DEVICES`` empty)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
