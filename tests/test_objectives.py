"""Objectives beyond the plain ELBO: the IWAE bound and a weighted KL, Pyro against plain PyTorch."""

import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from helpers import binary_images, synthetic_data
from pyrovae import Config, ModelConfig, build_vae
from pyrovae.config import ConfigError
from pyrovae.elbo_manual import ManualELBO, ManualIWAE
from pyrovae.objectives import PyroELBO, PyroIWAE

SMALL = ModelConfig(z_dim=3, hidden=(16,))


def _twins(config=SMALL):
    torch.manual_seed(0)
    a, b = build_vae(config), build_vae(config)
    b.load_state_dict(a.state_dict())
    return a, b


def _same_loss_and_grads(loss_a, a, loss_b, b, x, rtol=2e-6, kl_weight=1.0):
    torch.manual_seed(7)
    la = loss_a(x, kl_weight=kl_weight)
    la.backward()
    torch.manual_seed(7)
    lb = loss_b(x, kl_weight=kl_weight)
    lb.backward()
    torch.testing.assert_close(lb, la, rtol=rtol, atol=0)
    grads = dict(b.named_parameters())
    for name, p in a.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("particles", [1, 4])
@pytest.mark.parametrize("prior", ["normal", "vamp"])
def test_pyro_iwae_equals_the_hand_coded_iwae(particles, prior):
    a, b = _twins(SMALL.__class__(**{**SMALL.__dict__, "prior": prior, "prior_options":
                                     {"components": 4} if prior == "vamp" else {}}))
    _same_loss_and_grads(PyroIWAE(a, particles), a, ManualIWAE(b, particles), b, binary_images(8))


def test_iwae_with_one_particle_is_the_elbo():
    a, b = _twins()
    _same_loss_and_grads(ManualELBO(a, kl="mc"), a, ManualIWAE(b, 1), b, binary_images(8))


def test_iwae_bound_is_tighter_on_average():
    torch.manual_seed(0)
    vae = build_vae(SMALL)
    x = binary_images(16)
    with torch.no_grad():
        elbo = torch.stack([ManualIWAE(vae, 1)(x) for _ in range(50)]).mean()
        iwae = torch.stack([ManualIWAE(vae, 20)(x) for _ in range(50)]).mean()
    assert iwae < elbo  # -IWAE_20 < -ELBO


@pytest.mark.parametrize("pyro_elbo,kl", [(Trace_ELBO, "mc"), (TraceMeanField_ELBO, "analytic")])
def test_weighted_kl_matches_the_hand_coded_beta_elbo(pyro_elbo, kl):
    a, b = _twins()
    _same_loss_and_grads(PyroELBO(a, pyro_elbo()), a, ManualELBO(b, kl=kl), b, binary_images(8), kl_weight=0.3)
    with torch.no_grad():  # and it is log p(x|z) - beta KL: beta = 0 leaves the reconstruction alone
        torch.manual_seed(1)
        zero = ManualELBO(b, kl="analytic")(binary_images(8), kl_weight=0.0)
        torch.manual_seed(1)
        q = b.posterior(binary_images(8))
        z = q.rsample()
        recon = -b.likelihood(b.decoder(z)).log_prob(binary_images(8)).sum()
    torch.testing.assert_close(zero, recon)


def test_weighted_iwae_matches_the_hand_coded_one():
    a, b = _twins()
    _same_loss_and_grads(PyroIWAE(a, 4), a, ManualIWAE(b, 4), b, binary_images(8), kl_weight=0.3)


def test_kl_warmup_schedule_in_a_run(tmp_path, monkeypatch):
    import pyrovae.runs as runs

    seen = []
    real = runs.build_objective

    class Spy(torch.nn.Module):
        def __init__(self, loss):
            super().__init__()
            self.loss = loss

        def forward(self, x, kl_weight=1.0):
            seen.append(kl_weight)
            return self.loss(x, kl_weight=kl_weight)

    monkeypatch.setattr(runs, "build_objective",
                        lambda name, vae, particles, *args, **kwargs: Spy(real(name, vae, particles, *args, **kwargs)))
    config = Config().replace(model={"z_dim": 2, "hidden": (8,)},
                              train={"epochs": 2, "batch_size": 100, "kl_weight": 0.5, "kl_warmup_steps": 4})
    runs.train_run(config, tmp_path / "run", data=synthetic_data(n_train=300, n_test=50), quiet=True)
    assert seen == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])


@pytest.mark.parametrize("train,needle", [({"particles": 0}, "train.particles"), ({"kl_weight": 0.0}, "kl_weight"),
                                          ({"kl_warmup_steps": -2}, "kl_warmup_steps")])
def test_bad_objective_settings_are_refused(train, needle):
    with pytest.raises(ConfigError, match=needle):
        Config().replace(train=train)
    with pytest.raises(ValueError, match="K >= 1"):
        ManualIWAE(build_vae(SMALL), 0)


def test_a_run_given_an_earlier_objective_name_says_what_it_is_now(tmp_path):
    from helpers import synthetic_data
    from pyrovae.runs import train_run

    lines = []
    config = Config().replace(model={"z_dim": 2, "hidden": (8,)}, train={
        "objective": "manual_mc", "epochs": 1, "batch_size": 50, "device": "cpu"})
    train_run(config, tmp_path / "run", quiet=True, log=lines.append, data=synthetic_data(100, 20))
    assert [line for line in lines if "objective" in line] == [
        "note: train.objective 'manual_mc' is now train.objective = 'elbo' with train.implementation = 'manual'"]
