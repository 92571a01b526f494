"""How fast a training step is, against the hardware's floor: one benchmark, ratios from one run.

1. **An MNIST epoch** (60,000 images, dynamic binarization, batch 256, the default model) in
   interleaved rounds, each variant on the same data and the same device, each training variant
   gathering and binarizing its batches as it goes (as a training loop and NumPyro's jitted epoch do):
   - ``stock``: Pyro's ``SVI`` + ``Trace_ELBO`` with ``pyro.optim.Adam`` over the VAE's model and
     guide, on the in-memory dataset;
   - ``loop/<objective>``: our loop (``train_step`` with the fused Adam, validation off, as ``fit``
     runs it) with each Pyro objective: stock ``trace_elbo`` and ``meanfield_elbo``, and our
     host-sync-free ``elbo`` and ``meanfield`` (the default: ``pyrovae train``);
   - ``captured/<objective>`` (CUDA only, the default there): our loop's step captured once as a CUDA
     graph and replayed, for the default objective and the hand-coded one; its capture time apart;
   - ``loop/meanfield compiled``: the default's whole step (the loss, its gradients and the
     non-finite guard) traced below Python and compiled by inductor, then torch's fused Adam
     (``train.compile``, ``pyrovae.compiled.TracedLoss.step``), its trace and compilation time apart;
     ``loop/meanfield compiled loss only``: only the loss compiled, under the eager ``train_step``;
   - ``loop/meanfield onednn`` and ``loop/meanfield compiled onednn`` (CPU): the same, with the
     linear layers' products, forward and backward, through oneDNN (``train.matmul = onednn``,
     ``pyrovae.matmul``); ``train.matmul = auto`` takes this route where it measures faster;
   - ``hand/...``: the hand-coded ELBO (``manual_analytic``), eager and compiled the same way, and a
     plain PyTorch step written out (no module, no distributions);
   - ``numpyro jitted epoch`` (CPU, when jax and numpyro are importable): the same model in NumPyro
     with the whole epoch jitted, as its VAE example trains (``numpyro_vae.py``, a process of its own
     kept running, whose epochs take their turn in each round);
   - ``floor``: the step's matrix products alone (forward and backward of every linear layer),
     through torch's default BLAS (``torch.mm``) and through oneDNN (``mkldnn._linear_pointwise``
     and ``torch.mm`` on a oneDNN-packed weight where available); the faster of the two is the floor.
   The ratios asked of us: the default epoch / floor, the best hand-coded / floor, the default Pyro
   objective / the best hand-coded, ``trace_elbo`` / the best hand-coded, ours / NumPyro's. The
   default epoch is the variant ``pyrovae train`` takes here: on the CPU the whole step compiled,
   its products through the backend that ``train.matmul = auto`` measures faster on this machine
   (measured first, as a run does at start-up); on CUDA the captured step. Each
   variant's operators (CPU) and kernels (CUDA) per step come from torch's profiler.
2. **Peak memory**: the process's peak resident set after the epochs (everything it holds: torch,
   the data) and, on CUDA, ``torch.cuda.max_memory_allocated``.
3. **Scaling**: the per-image step time of the default objective and of the floor for batch sizes
   32 to 4096 and hidden widths 100 to 1600 (a table and a log-log PNG).
4. **IWAE-K throughput**: decoder rows (images x samples) per second of ``importance_log_likelihood``.
5. **The CIFAR-10 model** (``experiments/configs/cifar10.toml``): its training step against the
   floor of its own convolutions (each convolution's forward and backward alone, as recorded in
   one step).

    python experiments/benchmarks/benchmark_speed.py                 # a few minutes on 2 cores
    python experiments/benchmarks/benchmark_speed.py --smoke
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.nn import functional as F

from pyrovae.compiled import StaticStep, compile_loss
from pyrovae.matmul import OneDNNLoss, choose, onednn_available
from pyrovae.config import Config
from pyrovae.data import batches, prepare_train
from pyrovae.engine import make_optimizer, resolve_device, train_step
from pyrovae.evaluate import importance_log_likelihood
from pyrovae.experiment import add_output_flags, command, output_folders
from pyrovae.build import build_vae
from pyrovae.objectives import build_objective
from pyrovae.atomic import write_json
from pyrovae.provenance import provenance

OUT = "results/benchmark"
CIFAR_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10.toml"
PYRO_OBJECTIVES = ("trace_elbo", "meanfield_elbo", "elbo", "meanfield")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the variants: each returns a function that runs one step on a batch --------------------------
def loop_step(objective: str, device: torch.device, compiled: bool = False, hidden=(400,), onednn: bool = False,
              whole: bool = True):
    """Our loop's step; ``compiled``: the whole step traced below Python and compiled, as ``fit``
    takes it in one process (``train.compile``, :meth:`pyrovae.compiled.TracedLoss.step`), or with
    ``whole=False`` only the loss (:class:`pyrovae.compiled.TracedLoss` under :func:`train_step`);
    ``onednn``: the linear layers' products, forward and backward, through oneDNN
    (``train.matmul = onednn``)."""
    torch.manual_seed(0)
    vae = build_vae(Config().replace(model={"hidden": hidden}).model).to(device)
    loss_fn = build_objective(objective, vae)
    if onednn:
        loss_fn = OneDNNLoss(loss_fn)
    if compiled:
        loss_fn = compile_loss(loss_fn, log=lambda line: print(f"  {line}"))
    optimizer = make_optimizer(vae.parameters(), 1e-3, device)
    if compiled and whole:
        return lambda x: loss_fn.step(optimizer, x)
    return lambda x: train_step(loss_fn, optimizer, x)


def captured_step(objective: str, device: torch.device, seconds: dict):
    """Our loop's step as ``fit`` takes it by default on CUDA: captured once as a CUDA graph
    (:class:`pyrovae.compiled.StaticStep`, warm-up and capture timed into ``seconds``) and replayed;
    a batch of another shape (the last of an epoch) takes the eager step, as in ``fit``."""
    torch.manual_seed(0)
    vae = build_vae(Config().model).to(device)
    loss_fn = build_objective(objective, vae)
    optimizer = make_optimizer(vae.parameters(), 1e-3, device)
    captured = {}

    def step(x):
        if not captured:
            sync(device)
            began = time.perf_counter()
            with pyro.validation_enabled(False):
                captured["step"] = StaticStep(loss_fn, optimizer, x)
            sync(device)
            seconds[objective] = time.perf_counter() - began
        if x.shape == captured["step"].x.shape:
            return captured["step"](x)
        return train_step(loss_fn, optimizer, x)
    return step


def stock_step(device: torch.device):
    torch.manual_seed(0)
    pyro.clear_param_store()
    vae = build_vae(Config().model).to(device)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    return lambda x: svi.step(x)


def plain_step(device: torch.device):
    """The default model's step written out in plain PyTorch: the best a hand can do without a compiler."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(784, 400), nn.Softplus(), nn.Linear(400, 100)).to(device)
    dec = nn.Sequential(nn.Linear(50, 400), nn.Softplus(), nn.Linear(400, 784)).to(device)
    optimizer = make_optimizer([*enc.parameters(), *dec.parameters()], 1e-3, device)

    def step(x):
        x = x.flatten(1)
        loc, raw = enc(x).chunk(2, -1)
        scale = F.softplus(raw) + 1e-4
        z = loc + scale * torch.randn_like(scale)
        log_px = -F.binary_cross_entropy_with_logits(dec(z), x, reduction="sum")
        kl = (0.5 * (loc ** 2 + scale ** 2 - 1) - scale.log()).sum()
        loss = kl - log_px
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def linear_shapes(batch: int, hidden: int, z_dim: int = 50, x_dim: int = 784) -> list[tuple[int, int, int]]:
    """(rows, in, out) of the default MLP VAE's linear layers for one batch."""
    return [(batch, x_dim, hidden), (batch, hidden, 2 * z_dim), (batch, z_dim, hidden), (batch, hidden, x_dim)]


def floor_step(device: torch.device, batch: int, hidden: int, route: str):
    """The step's matrix products alone: y = x W^T forward, dx = dy W and dW = dy^T x backward (no dx
    for the first layer), on stored operands. ``route``: "blas" (torch.mm) or "onednn"."""
    g = torch.Generator(device="cpu").manual_seed(0)
    layers = []
    for rows, n_in, n_out in linear_shapes(batch, hidden):
        x, w, dy = (torch.randn(*s, generator=g).to(device) for s in ((rows, n_in), (n_out, n_in), (rows, n_out)))
        layers.append((x, w, dy, x.t().contiguous(), dy.t().contiguous()))
    onednn = route == "onednn" and device.type == "cpu" and torch.backends.mkldnn.is_available()
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0]) if onednn else None for x, w, *_ in layers] \
        if onednn and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") else [None] * len(layers)

    def step(_):
        for i, (x, w, dy, xt, dyt) in enumerate(layers):
            if onednn and packed[i] is not None:
                torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")
            else:
                torch.mm(x, w.t())
            if i:
                torch.mm(dy, w)
            torch.mm(dyt, x)
        return None
    return step


# --- timing ---------------------------------------------------------------------------------------
def time_rounds(variants: dict, make_batches, rounds: int, device: torch.device,
                lazy: set = frozenset(), whole: set = frozenset()) -> dict[str, list[float]]:
    """Seconds of one pass over ``make_batches()`` for each variant, rounds interleaved. The batches
    are made before the clock starts, except for the variants in ``lazy``, which are timed as a
    training loop runs: each batch gathered and binarized when its step needs it. A variant in
    ``whole`` runs a whole epoch in one call, with data of its own (NumPyro's jitted epoch)."""
    times = {name: [] for name in variants}
    with pyro.validation_enabled(False):
        for _ in range(rounds):
            for name, step in variants.items():
                data = [None] if name in whole else make_batches(lazy=True) if name in lazy else make_batches()
                sync(device)
                start = time.perf_counter()
                for x in data:
                    step(x)
                sync(device)
                times[name].append(time.perf_counter() - start)
    return times


def default_variant(device: torch.device, x: torch.Tensor, log) -> tuple[str, dict]:
    """The variant ``pyrovae train`` with no options runs here, and how it chose its products: on
    CUDA the captured step; on the CPU the whole step compiled, its products through the backend
    ``train.matmul = auto`` measures on the default model and this batch, as a long run does."""
    if device.type == "cuda":
        return "captured/meanfield", {}
    torch.manual_seed(0)
    loss_fn = build_objective("meanfield", build_vae(Config().model).to(device))
    with pyro.validation_enabled(False):
        choice = choose("auto", loss_fn, device, lambda: x, steps=10 ** 6, log=lambda line: log(f"  {line}"))
    return ("loop/meanfield compiled onednn" if choice.backend == "onednn" else "loop/meanfield compiled"), dict(choice)


def epoch_section(args, device, log) -> dict:
    config = Config().replace(train={"train_subset": args.images})
    images, per_batch = prepare_train(config, device)
    generator = torch.Generator(device=device).manual_seed(1)

    def make_batches(lazy=False):  # the binarized batches of one epoch (drawn as they are needed, if lazy)
        epoch = batches(images, args.batch_size, generator, per_batch)
        return epoch if lazy else list(epoch)
    steps = -(-images.shape[0] // args.batch_size)
    default, matmul = "loop/meanfield", {}  # without the compiled variants the eager loop stands in
    if not (args.smoke or args.no_compiled):
        default, matmul = default_variant(device, make_batches()[0], log)  # measured before anything else runs
    variants = {"stock": stock_step(device)}
    for objective in PYRO_OBJECTIVES:
        variants[f"loop/{objective}"] = loop_step(objective, device)
    variants["hand/manual_analytic"] = loop_step("manual_analytic", device)
    cpu_onednn = device.type == "cpu" and onednn_available()
    if cpu_onednn:  # the products through oneDNN (train.matmul), which train.matmul = auto chooses by measuring
        variants["loop/meanfield onednn"] = loop_step("meanfield", device, onednn=True)
    compile_seconds = {}
    if not (args.smoke or args.no_compiled):  # (compiling takes seconds; tests/test_compiled.py checks it)
        for objective, name, onednn, whole in (("meanfield", "loop/meanfield compiled", False, True),
                                               ("meanfield", "loop/meanfield compiled loss only", False, False),
                                               ("manual_analytic", "hand/manual_analytic compiled", False, True),
                                               ("meanfield", "loop/meanfield compiled onednn", True, True)):
            if onednn and not cpu_onednn:
                continue
            began = time.perf_counter()
            variants[name] = compiled_or_none(
                lambda: loop_step(objective, device, compiled=True, onednn=onednn, whole=whole), make_batches()[:3], log)
            compile_seconds[name] = time.perf_counter() - began  # the trace, the compilation and two steps
    capture_seconds = {}
    if device.type == "cuda":  # the default there: the step replayed as a CUDA graph
        for objective in ("meanfield", "manual_analytic"):
            variants[f"captured/{objective}"] = captured_step(objective, device, capture_seconds)
    variants["hand/plain"] = plain_step(device)
    for route in ("blas", "onednn"):
        variants[f"floor/{route}"] = floor_step(device, args.batch_size, 400, route)
    variants = {k: v for k, v in variants.items() if v is not None}
    numpyro = NumPyroEpochs.start(images, args.batch_size, log) if device.type == "cpu" and not args.smoke else None
    for step in variants.values():  # warm up: allocator, oneDNN primitives, first-call costs
        with pyro.validation_enabled(False):
            for x in make_batches()[:3]:
                step(x)
    log(f"epoch: {images.shape[0]} images, batch {args.batch_size} ({steps} steps), {args.rounds} rounds of "
        f"{len(variants)} variants, interleaved")
    operators = {name: operators_per_step(step, make_batches()[:4], device) for name, step in variants.items()
                 if not name.startswith("floor/")}
    # every training variant pays for its batches (the gather and the binarization) as a loop does, and
    # as NumPyro's jitted epoch does inside it; the floors do not
    lazy = {k for k in variants if "floor" not in k}
    if numpyro is not None:  # its epochs take turns with ours, round by round
        variants["numpyro jitted epoch"] = numpyro
    try:
        times = time_rounds(variants, make_batches, args.rounds, device, lazy=lazy, whole={"numpyro jitted epoch"})
    finally:
        numpyro = numpyro.close() if numpyro is not None else {"skipped": "CPU only, not under --smoke, needs jax and numpyro"}
    if "seconds" in numpyro:
        times["numpyro jitted epoch"] = numpyro["seconds"][1:]  # as NumPyro's process timed them
    median = {k: statistics.median(v) for k, v in times.items()}
    median["floor"] = min(median["floor/blas"], median["floor/onednn"])
    hand = min((k for k in median if k.startswith("hand/")), key=median.get)
    if default not in median:  # its compilation failed (compiled_or_none said why): the eager loop stands in
        default = "loop/meanfield"
    log(f"  the default (pyrovae train) here: {default}")
    ratios = {
        f"default epoch ({default}) / floor": median[default] / median["floor"],
        "eager loop (loop/meanfield) / floor": median["loop/meanfield"] / median["floor"],
        f"best hand-coded ({hand}) / floor": median[hand] / median["floor"],
        "default Pyro objective (meanfield) / best hand-coded": median["loop/meanfield"] / median[hand],
        "loop/trace_elbo / best hand-coded": median["loop/trace_elbo"] / median[hand],
        "stock SVI / loop/meanfield": median["stock"] / median["loop/meanfield"],
    }
    if "captured/meanfield" in median:
        ratios["default epoch on CUDA (captured/meanfield) / floor"] = median["captured/meanfield"] / median["floor"]
        ratios["stock SVI / captured/meanfield"] = median["stock"] / median["captured/meanfield"]
        ratios["loop/meanfield (eager) / captured/meanfield"] = median["loop/meanfield"] / median["captured/meanfield"]
        for objective, seconds in capture_seconds.items():
            log(f"  capture of captured/{objective} (3 warm-up steps and the capture): {seconds:.3f} s")
    if "loop/meanfield onednn" in median:
        ratios["loop/meanfield (BLAS) / loop/meanfield onednn"] = median["loop/meanfield"] / median["loop/meanfield onednn"]
    if "loop/meanfield compiled onednn" in median:
        ratios["loop/meanfield compiled (BLAS) / loop/meanfield compiled onednn"] = \
            median["loop/meanfield compiled"] / median["loop/meanfield compiled onednn"]
    if "loop/meanfield compiled" in median:
        ratios["loop/meanfield compiled / floor"] = median["loop/meanfield compiled"] / median["floor"]
        ratios["loop/meanfield (eager) / loop/meanfield compiled"] = \
            median["loop/meanfield"] / median["loop/meanfield compiled"]
        if "loop/meanfield compiled loss only" in median:
            ratios["the loss alone compiled / the whole step compiled"] = \
                median["loop/meanfield compiled loss only"] / median["loop/meanfield compiled"]
        for name, seconds in compile_seconds.items():
            log(f"  trace and compilation of {name} (with its first two steps): {seconds:.1f} s")
    if "seconds_per_epoch" in numpyro:
        ratios[f"default epoch ({default}) / numpyro jitted epoch"] = median[default] / numpyro["seconds_per_epoch"]
        for ours in ("loop/meanfield", "loop/meanfield compiled", "loop/meanfield compiled onednn"):
            if ours in median:
                ratios[f"{ours} / numpyro jitted epoch"] = median[ours] / numpyro["seconds_per_epoch"]
    for name, seconds in sorted(median.items(), key=lambda kv: kv[1]):
        ops = operators.get(name)
        log(f"  {name:34s} {seconds:8.3f} s/epoch  {seconds / median['floor']:6.2f}x floor"
            + (f"  {ops['operators']:5.0f} operators" + (f", {ops['kernels']:4.0f} kernels" if ops.get('kernels')
                                                          else "") + " a step" if ops else ""))
    for name, ratio in ratios.items():
        log(f"  ratio {name}: {ratio:.3f}")
    return {"images": images.shape[0], "batch_size": args.batch_size, "rounds": args.rounds,
            "seconds_per_epoch": median, "all_rounds": times, "best_hand_coded": hand, "ratios": ratios,
            "default": default, "default_matmul": matmul,
            "capture_seconds": capture_seconds, "compile_seconds": compile_seconds, "numpyro": numpyro,
            "per_step": operators}


def operators_per_step(step, batches: list, device: torch.device) -> dict:
    """What one step of a variant runs, from torch's profiler over a few steps: the operators
    dispatched on the CPU (aten operators, including those inside others) and, on CUDA, the kernels
    launched. A compiled graph counts as the few calls it makes; a CUDA graph replay as its kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with pyro.validation_enabled(False), profile(activities=activities) as prof:
        for x in batches:
            step(x)
        sync(device)
    events = prof.events()
    operators = sum(1 for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU")
    kernels = sum(1 for e in events if e.device_type.name == "CUDA")
    return {"operators": operators / len(batches), "kernels": kernels / len(batches) if device.type == "cuda" else None}


class NumPyroEpochs:
    """NumPyro's jitted epoch of the same model on the same images, in a process of its own kept
    running (``numpyro_vae.py --serve``): each call runs one more epoch there, so its epochs take
    turns with ours in the same rounds. The time of an epoch is the one NumPyro's process measures
    (the pipe's round trip is left out). Its epochs take full batches only (234 steps of 256 for
    60,000 images, ours 235). ``start`` returns None, with one line saying why, where jax or
    numpyro is not importable or the process fails."""

    def __init__(self, process, errors, first: dict):
        self.process, self.errors, self.first, self.epochs = process, errors, first, []

    @classmethod
    def start(cls, images: torch.Tensor, batch_size: int, log) -> NumPyroEpochs | None:
        import importlib.util
        import json
        import subprocess
        import sys
        import tempfile

        import numpy as np

        missing = [m for m in ("jax", "numpyro") if importlib.util.find_spec(m) is None]
        if missing:
            log(f"  numpyro row skipped: {', '.join(missing)} not importable (pip install jax numpyro)")
            return None
        errors = tempfile.TemporaryFile()  # its warnings: a pipe nobody reads could fill and stall it
        with tempfile.TemporaryDirectory() as scratch:  # read by the process before its first line
            path = Path(scratch) / "images.npy"
            np.save(path, images.reshape(images.shape[0], -1).cpu().numpy())
            process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("numpyro_vae.py")), str(path),
                                        "--serve", "--batch-size", str(batch_size)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
            line = process.stdout.readline()
        if not line:
            process.kill()
            process.wait()
            process.stdin.close()
            process.stdout.close()
            errors.seek(0)
            log(f"  numpyro row failed: {errors.read().decode(errors='replace').strip().splitlines()[-1:]}")
            errors.close()
            return None
        first = json.loads(line)
        log(f"  numpyro: first epoch, with XLA's compilation, {first['seconds'][0]:.1f} s; "
            f"jax {first['versions']['jax']}, numpyro {first['versions']['numpyro']}")
        return cls(process, errors, first)

    def __call__(self, _batch=None) -> None:
        import json

        self.process.stdin.write("epoch\n")
        self.process.stdin.flush()
        self.epochs.append(json.loads(self.process.stdout.readline()))

    def close(self) -> dict:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.process.stdout.close()
        self.errors.close()
        seconds = [e["seconds"] for e in self.epochs]
        return {**self.first, "seconds": self.first["seconds"] + seconds,
                "neg_elbo": self.first["neg_elbo"] + [e["neg_elbo"] for e in self.epochs],
                "seconds_per_epoch": statistics.median(seconds), "interleaved": True}


def compiled_or_none(make, example, log):
    """A compiled variant, or None (and one line saying why) if compilation fails here."""
    try:
        step = make()
        with pyro.validation_enabled(False):
            for x in example:
                step(x)
        return step
    except Exception as e:  # a compiler that cannot run here (no C++ toolchain, unsupported op)
        log(f"  compiled variant skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return None


def scaling_section(args, device, log) -> list[dict]:
    rows = []
    for hidden in args.widths:
        for batch in args.batch_sizes:
            x = torch.bernoulli(torch.full((batch, 1, 28, 28), 0.3, device=device))
            variants = {"meanfield": loop_step("meanfield", device, hidden=(hidden,)),
                        "floor": floor_step(device, batch, hidden, "onednn")}
            times = time_rounds(variants, lambda: [x] * args.scaling_steps, 2, device)
            row = {"hidden": hidden, "batch": batch,
                   **{f"{k}_us_per_image": 1e6 * min(v) / (args.scaling_steps * batch) for k, v in times.items()}}
            row["ratio"] = row["meanfield_us_per_image"] / row["floor_us_per_image"]
            rows.append(row)
            log(f"  hidden {hidden:5d} batch {batch:5d}: {row['meanfield_us_per_image']:8.2f} us/image, floor "
                f"{row['floor_us_per_image']:8.2f}, ratio {row['ratio']:.2f}")
    return rows


def scaling_plot(rows, path) -> None:
    from pyrovae import plots

    fig, ax = plots.plt.subplots(figsize=(5.5, 4))
    for hidden in sorted({r["hidden"] for r in rows}):
        mine = [r for r in rows if r["hidden"] == hidden]
        line, = ax.loglog([r["batch"] for r in mine], [r["meanfield_us_per_image"] for r in mine], "o-",
                          label=f"hidden {hidden}")
        ax.loglog([r["batch"] for r in mine], [r["floor_us_per_image"] for r in mine], "--", color=line.get_color())
    ax.set_xlabel("batch size")
    ax.set_ylabel("microseconds per image per step")
    ax.set_title("training step (solid) and its matrix products (dashed)")
    ax.legend(fontsize=8)
    plots.save(fig, path)


def iwae_section(args, device, log) -> dict:
    torch.manual_seed(0)
    vae = build_vae(Config().model).to(device).eval()
    x = torch.bernoulli(torch.full((args.iwae_images, 1, 28, 28), 0.3, device=device))
    importance_log_likelihood(vae, x[:10], k=10)  # warm up
    sync(device)
    start = time.perf_counter()
    importance_log_likelihood(vae, x, k=args.iwae_k)
    sync(device)
    seconds = time.perf_counter() - start
    rows = args.iwae_images * args.iwae_k
    log(f"IWAE-{args.iwae_k} on {args.iwae_images} images: {seconds:.2f} s, {rows / seconds / 1e6:.2f} M decoder rows/s; "
        f"the 10,000 MNIST test images at K=5000 would take {1e4 * 5000 / (rows / seconds):.0f} s")
    return {"k": args.iwae_k, "images": args.iwae_images, "seconds": seconds, "rows_per_second": rows / seconds}


def cifar_section(args, device, log) -> dict:
    config = Config.load(CIFAR_CONFIG, [f"train.batch_size={args.cifar_batch}"])
    torch.manual_seed(0)
    vae = build_vae(config.model, (3, 32, 32)).to(device)
    if config.model.network_options.get("channels_last"):
        vae = vae.to(memory_format=torch.channels_last)
    loss_fn = build_objective(config.train.objective, vae, implementation=config.train.implementation)
    optimizer = make_optimizer(vae.parameters(), 1e-3, device)
    x = (torch.randint(0, 256, (args.cifar_batch, 3, 32, 32), device=device).float() / 255)
    convs = []  # (input, conv module) of every convolution in one step

    def record(module, inputs, output):
        convs.append((inputs[0].detach().clone(), module))
    hooks = [m.register_forward_hook(record) for m in vae.modules() if isinstance(m, nn.Conv2d)]
    with pyro.validation_enabled(False):
        train_step(loss_fn, optimizer, x)
    for h in hooks:
        h.remove()

    def conv_floor(_):  # each convolution forward and backward (input and weight gradients) alone
        for inp, conv in convs:
            inp = inp.requires_grad_(True)
            out = F.conv2d(inp, conv.weight.detach().requires_grad_(True), None, conv.stride, conv.padding)
            out.backward(torch.ones_like(out))
    variants = {"step": lambda _: train_step(loss_fn, optimizer, x), "convolutions": conv_floor}
    times = time_rounds(variants, lambda: [x] * args.cifar_steps, args.rounds, device)
    median = {k: statistics.median(v) / args.cifar_steps for k, v in times.items()}
    ratio = median["step"] / median["convolutions"]
    log(f"CIFAR-10 model ({config.model.network}, batch {args.cifar_batch}): step {1e3 * median['step']:.1f} ms, its "
        f"{len(convs)} convolutions alone {1e3 * median['convolutions']:.1f} ms: ratio {ratio:.2f}")
    return {"batch": args.cifar_batch, "step_ms": 1e3 * median["step"],
            "convolutions_ms": 1e3 * median["convolutions"], "ratio": ratio, "convolutions": len(convs)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--images", type=int, default=60000, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512, 2048, 4096])
    parser.add_argument("--widths", type=int, nargs="+", default=[100, 400, 1600])
    parser.add_argument("--scaling-steps", type=int, default=5)
    parser.add_argument("--iwae-k", type=int, default=1000)
    parser.add_argument("--iwae-images", type=int, default=100)
    parser.add_argument("--cifar-batch", type=int, default=64)
    parser.add_argument("--cifar-steps", type=int, default=3)
    parser.add_argument("--only", choices=["cifar10"], default=None,
                        help="run one section alone: cifar10, the CIFAR-10 step against its convolutions")
    parser.add_argument("--no-compiled", action="store_true", help="leave out the two torch.compile variants "
                        "(each compiles for tens of seconds)")
    add_output_flags(parser, out=OUT, smoke="seconds-long run: 1,024 images, no compiled variants, tiny scaling "
                                            "grid, IWAE-20")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.rounds, args.batch_sizes, args.widths = 1024, 1, [32, 128], [100]
        args.scaling_steps, args.iwae_k, args.iwae_images, args.cifar_batch, args.cifar_steps = 2, 20, 20, 8, 1
    device = resolve_device(args.device)
    lines = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with output_folders(args.smoke, args.out, default_out=OUT) as folders:
        folders.out.mkdir(parents=True, exist_ok=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results = {"device": str(device)}
        if args.only == "cifar10":  # the CIFAR-10 step against its convolutions, alone
            results["cifar10"] = cifar_section(args, device, log)
            results.update(provenance(device))
            results["command"] = command(__file__, argv)
            write_json(folders.out / "results.json", results)
            (folders.out / "output.txt").write_text("\n".join(lines) + "\n")
            return
        results["epoch"] = epoch_section(args, device, log)
        results["memory"] = {"peak_resident_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                             "cuda_peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30
                             if device.type == "cuda" else None}
        log(f"peak resident memory of this process {results['memory']['peak_resident_gb']:.2f} GB"
            + (f", CUDA peak {results['memory']['cuda_peak_allocated_gb']:.2f} GB" if device.type == "cuda" else ""))
        log("scaling (per image and step):")
        results["scaling"] = scaling_section(args, device, log)
        scaling_plot(results["scaling"], folders.out / "scaling.png")
        results["iwae"] = iwae_section(args, device, log)
        results["cifar10"] = cifar_section(args, device, log)
        results.update(provenance(device))
        results["command"] = command(__file__, argv)
        write_json(folders.out / "results.json", results)
        (folders.out / "output.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
