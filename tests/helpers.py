"""Helpers shared by the tests: small synthetic data, grids and distances for density checks, and running
an experiment script's smoke test."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pyro
import torch

from pyrovae.data import Prepared, binarize

ROOT = Path(__file__).resolve().parents[1]


def binary_images(n=8, shape=(1, 28, 28), seed=0):
    """n images of 0/1 pixels, each pixel 1 with probability 0.3."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *shape), 0.3), generator=g)


def grey_images(n=8, shape=(1, 28, 28), seed=0):
    """n uint8 images of random grey levels, brighter in the middle (so a VAE has something to learn)."""
    g = torch.Generator().manual_seed(seed)
    h, w = shape[-2:]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    centre = (1 - (xs**2 + ys**2)).clamp(0, 1)  # (H, W)
    levels = torch.rand((n, *shape), generator=g) * 0.5 + centre * 0.5
    return (levels * 255).round().to(torch.uint8)


def synthetic_data(n_train=600, n_test=100, shape=(1, 28, 28), seed=0) -> Prepared:
    """A binary dataset prepared as for the Bernoulli likelihood: uint8 training images binarized per
    batch (dynamically), test images binarized once."""
    train = grey_images(n_train, shape, seed)
    test = binarize(grey_images(n_test, shape, seed + 1), torch.Generator().manual_seed(0))
    return Prepared(train, binarize, test, torch.arange(n_test) % 10, "binary")


def run_smoke(script, data_root, *args, timeout=600):
    """Run ``experiments/<script> --smoke ARGS`` as a subprocess (data root ``data_root`` if given); its stdout."""
    env = {**os.environ, "PYROVAE_DATA": str(data_root)} if data_root is not None else None
    result = subprocess.run([sys.executable, f"experiments/{script}", "--smoke", *args], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def image_folder(root: Path, n_train=600, n_test=100, shape=(1, 28, 28), seed=0) -> Path:
    """A folder dataset in the ``folder:PATH`` layout (root/train/<class>/*.png and root/test/...), of
    synthetic grey images; returns ``root``."""
    from PIL import Image

    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images = grey_images(n, shape, s)
        for i, img in enumerate(images):
            folder = root / split / f"class{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            array = img.permute(1, 2, 0).squeeze(-1).numpy() if shape[0] == 1 else img.permute(1, 2, 0).numpy()
            Image.fromarray(array).save(folder / f"{i:05d}.png")
    return root


def data_of_kind(kind, n=4, shape=(2, 3, 4), seed=0):
    """Random images of a data kind: 0/1, levels k/255, or grey levels in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    if kind == "binary":
        return torch.bernoulli(torch.full((n, *shape), 0.3), generator=g)
    if kind == "8bit":
        return torch.randint(0, 256, (n, *shape), generator=g).float() / 255
    if kind == "unit":
        return torch.rand((n, *shape), generator=g)
    raise ValueError(f"unknown data kind {kind!r}")


def small_options(cls) -> dict:
    """Options that keep a part small: three components where it takes ``components``."""
    return {"components": 3} if "components" in inspect.signature(cls.__init__).parameters else {}


#: Tensor methods that copy a value from the device to the host (a synchronisation on CUDA).
HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


class CountHostReads:
    """Counts the calls of every Tensor method that copies a value from the device to the host, from
    construction until ``monkeypatch.undo()``."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def host_reads_of_steps(loss_fn, optimizer, x, monkeypatch, steps: int = 3) -> list[str]:
    """The host reads made by ``steps`` training steps (KL weight 0.5, gradient clipping, Pyro's
    validation off) after a first step that creates the optimizer state."""
    import pyro

    from pyrovae.engine import train_step

    with pyro.validation_enabled(False):
        train_step(loss_fn, optimizer, x)
        counter = CountHostReads(monkeypatch)
        for _ in range(steps):
            train_step(loss_fn, optimizer, x, kl_weight=0.5, grad_clip=10.0)
    monkeypatch.undo()
    return counter.calls


def assert_one_step_moves_every_parameter(vae, x) -> None:
    """One Adam step on Pyro's Trace_ELBO of ``x``: the loss is finite and every parameter moves."""
    from pyrovae.objectives import PyroELBO

    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    loss_fn = PyroELBO(vae)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    loss = loss_fn(x)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    unchanged = [name for name, p in vae.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged, f"one step left these parameters unchanged: {unchanged}"


def grid_2d(lim, step, dtype=torch.float64):
    """Midpoints of a square grid on [-lim, lim]^2: (points, (n*n, 2)) with z_1 varying slowest."""
    g = torch.arange(-lim, lim, step, dtype=dtype) + step / 2
    return g, torch.cartesian_prod(g, g)


def ks_distance(samples, g, marginal_density, step):
    """Kolmogorov-Smirnov distance of 1-d samples from a density tabulated at grid midpoints g."""
    mass = marginal_density * step / (marginal_density * step).sum()  # per grid cell
    below = torch.cumsum(mass, 0) - mass  # CDF at the lower edge of each cell
    s = samples.sort().values.to(g.dtype)
    cell = torch.searchsorted(g + step / 2, s).clamp(max=len(g) - 1)
    within = ((s - (g[cell] - step / 2)) / step).clamp(0, 1)
    model_cdf = below[cell] + within * mass[cell]  # linear within a cell
    n = len(s)
    above_steps = (torch.arange(1, n + 1, dtype=g.dtype) / n - model_cdf).abs().max()
    below_steps = (torch.arange(0, n, dtype=g.dtype) / n - model_cdf).abs().max()
    return max(above_steps, below_steps).item()


def extreme_bernoulli_case(shape):
    """Bernoulli logits (40, 5, *shape) with saturated values among them, binary x (5, *shape), the
    likelihood, and the float64 reference log-density (40, 5)."""
    from pyrovae.likelihoods import LIKELIHOODS

    g = torch.Generator().manual_seed(1)
    logits = torch.randn((40, 5, *shape), generator=g) * 6
    logits.view(-1)[:12] = torch.tensor([-200.0, 200.0, 0.0, 17.0, -17.0, 30.0, -30.0, 88.0, -88.0, 1e-8, 5.0, -5.0])
    x = torch.bernoulli(torch.full((5, *shape), 0.4), generator=g)
    lik = LIKELIHOODS["bernoulli"].build(shape)
    reference = torch.distributions.Bernoulli(logits=logits.double()).log_prob(x.double()).flatten(-3).sum(-1)
    return logits, x, lik, reference


#: Synthetic LFW trees: where the person folders go, under the data root, for each layout the loader reads.
LFW_LAYOUTS = {"torchvision": ("lfw-py", "lfw_funneled"), "unpacked": ("lfw", "lfw_funneled"),
               "original": ("lfw", "lfw"), "persons": ("lfw",)}


def lfw_people(n_train=4, n_test=2) -> tuple[list[str], list[str]]:
    """Names of made-up people, ``n_train`` on the training side of LFW's split by person and ``n_test``
    on the test side."""
    from pyrovae.data import lfw_is_test_person

    train, test = [], []
    for i in range(10_000):
        name = f"Person_{i:04d}"
        side = test if lfw_is_test_person(name) else train
        if len(side) < (n_test if side is test else n_train):
            side.append(name)
        if len(train) == n_train and len(test) == n_test:
            return train, test
    raise AssertionError("not enough names on both sides of the split")


def lfw_tree(root: Path, layout="torchvision", n_train=4, n_test=2, per_person=3, size=250, seed=0) -> Path:
    """A small LFW copy under the data root ``root``: random colour JPEGs (``size`` x ``size``, brighter in
    the middle) at ``<folder>/<person>/<person>_NNNN.jpg``, the folder given by ``LFW_LAYOUTS[layout]``;
    returns ``root``."""
    train, test = lfw_people(n_train, n_test)
    folder = root.joinpath(*LFW_LAYOUTS[layout])
    for k, person in enumerate(train + test):
        (folder / person).mkdir(parents=True, exist_ok=True)
        images = grey_images(per_person, (3, size, size), seed=seed + k)
        for i, image in enumerate(images, start=1):
            write_jpeg(image, folder / person / f"{person}_{i:04d}.jpg")
    return root


def write_jpeg(image: torch.Tensor, path: Path, quality=90) -> None:
    """Save a (3, H, W) uint8 tensor as a JPEG file (with Pillow: torchvision's encoders are deprecated)."""
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, quality=quality)


# --- runs compared bit for bit, and data on a device ---------------------------------------------
def prepared_on(data: Prepared, device) -> Prepared:
    """The same prepared data with the training and test images on ``device`` (labels stay on the CPU,
    as :func:`pyrovae.data.prepare_test` leaves them)."""
    return data._replace(train=data.train.to(device), test=data.test.to(device))


def run_rows(metrics: dict) -> list[dict]:
    """A run's per-epoch figures without the timings: what two identical runs share exactly."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in metrics["epochs"]]


def assert_same_run(metrics_a: dict, metrics_b: dict, folder_a: Path, folder_b: Path) -> None:
    """Two runs agree bit for bit: every epoch's figures (time aside), every parameter and every Adam
    moment in their checkpoints."""
    from pyrovae.checkpoint import load_checkpoint

    assert run_rows(metrics_a) == run_rows(metrics_b)
    a, b = (load_checkpoint(folder / "checkpoint.pt") for folder in (folder_a, folder_b))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "the parameters differ"
    moments_a, moments_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert moments_a.keys() == moments_b.keys()
    assert all(torch.equal(moments_a[i][k], moments_b[i][k]) for i in moments_a for k in moments_a[i]), \
        "the optimizer states differ"


def assert_traced_equals_eager(loss_fn, traced, module, x, seed=11, kl_weight=0.7):
    """``traced`` (a :class:`pyrovae.compiled.TracedLoss` of ``loss_fn``) gives ``loss_fn``'s loss and
    gradients for ``module``'s parameters on ``x`` bit for bit, under the same noise."""
    results = []
    for fn in (loss_fn, traced):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with pyro.validation_enabled(False):
            loss = fn(x, kl_weight=kl_weight)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]))
    (eager, eager_grads), (replayed, replayed_grads) = results
    assert torch.equal(eager, replayed)
    assert len(eager_grads) == len(replayed_grads) and all(map(torch.equal, eager_grads, replayed_grads))
