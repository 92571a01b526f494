# The training step of experiments/configs/cifar10.toml (at commit 4cb0b7c) per image, for four batch
# sizes, on random 8-bit images: two rounds, the faster of each. Run from the repository root.
import time, torch, pyro
from pyrovae import Config, build_vae
from pyrovae.engine import make_optimizer, train_step
from pyrovae.objectives import build_objective
cfg = Config.load("experiments/configs/cifar10.toml", [])
res = {}
for rnd in range(2):
    for b in (32, 64, 128, 256):
        torch.manual_seed(0)
        vae = build_vae(cfg.model, image_shape=(3, 32, 32))
        loss = build_objective("meanfield", vae, 1); opt = make_optimizer(vae.parameters(), 1e-3, torch.device("cpu"))
        x = torch.rand(b, 3, 32, 32).mul(255).round().div(255)
        with pyro.validation_enabled(False):
            for _ in range(2): train_step(loss, opt, x)
            n = max(2, 1024 // b); t = time.perf_counter()
            for _ in range(n): train_step(loss, opt, x)
        res.setdefault(b, []).append((time.perf_counter() - t) / n / b * 1e3)
for b, v in res.items(): print(f"batch {b}: {min(v):.2f} ms per image per step")
