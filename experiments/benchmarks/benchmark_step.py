"""Seconds per optimizer step of the default MNIST VAE, seven ways, interleaved in one run.

1. ``pyro_trace``: our step (``pyrovae.engine.train_step``, fused Adam) on ``PyroELBO(vae, Trace_ELBO())``.
2. ``pyro_meanfield``: our step on ``PyroELBO(vae, TraceMeanField_ELBO())``.
3. ``svi_trace``: stock ``SVI(vae.model, vae.guide, pyro.optim.Adam, Trace_ELBO())``.
4. ``svi_jit_trace``: stock ``SVI`` with ``JitTrace_ELBO`` (its ``differentiable_loss`` is not compiled,
   only ``loss_and_grads``, which ``SVI.step`` calls).
5. ``svi_jit_meanfield``: stock ``SVI`` with ``JitTraceMeanField_ELBO``, as Pyro 1.9.2 ships it.
6. ``svi_jit_meanfield_cached``: the same with :class:`CachedJitTraceMeanField_ELBO`, which keeps its
   compiled loss between steps (see below).
7. ``manual``: our step on the hand-coded ``ManualELBO(vae, kl="mc")``, the reference of the ratios
   (the estimator of ``Trace_ELBO``, written in plain PyTorch).

Every method has its own copy of one initialization and steps on the same fixed batches (binarized
once, checked once; then every method runs with Pyro's validation off, as ``fit`` does). For each
batch size, each round runs ``--steps`` steps of every method in turn, so a noisy machine slows them
alike; round 0 warms up (and compiles) and is not counted. The script prints the median seconds per
step and the ratio to ``manual``, and the number of times each JIT method traced its loss.

Why a cached variant: ``JitTraceMeanField_ELBO.differentiable_loss`` in Pyro 1.9.2 stores its compiled
function in ``self._differentiable_loss`` but tests ``self._loss_and_surrogate_loss`` (the attribute
``JitTrace_ELBO`` uses) to decide whether to build it, so every call builds a new
``pyro.ops.jit.CompiledFunction`` with an empty cache and traces the model and guide again.

    python experiments/benchmarks/benchmark_step.py --rounds 3 --steps 10
    python experiments/benchmarks/benchmark_step.py --batch-sizes 256 --profile
    python experiments/benchmarks/benchmark_step.py --smoke
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import io
import pstats
import statistics
import sys
import time
import warnings

import pyro
import torch
from pyro.infer import SVI, JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyrovae.config import Config
from pyrovae.data import binarize, load_mnist
from pyrovae.elbo_manual import ManualELBO
from pyrovae.engine import make_optimizer, train_step
from pyrovae.experiment import add_output_flags, output_folders
from pyrovae.model import build_vae
from pyrovae.objectives import PyroELBO
from pyrovae.runs import provenance, write_json

REFERENCE = "manual"
OUT = "results/benchmark_step"


class CachedJitTraceMeanField_ELBO(JitTraceMeanField_ELBO):
    """``JitTraceMeanField_ELBO`` that traces once and reuses the compiled loss on later calls.

    The parent builds its compiled function when ``self._loss_and_surrogate_loss`` is None, but only
    ever sets ``self._differentiable_loss``; pointing the first at the second makes the check pass.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        self._loss_and_surrogate_loss = getattr(self, "_differentiable_loss", None)
        return super().differentiable_loss(model, guide, *args, **kwargs)


class TraceCounter:
    """Counts calls of ``torch.jit.trace`` (each is one compilation of a Pyro JIT loss) while active."""

    def __init__(self):
        self.count = 0

    @contextlib.contextmanager
    def counting(self):
        original = torch.jit.trace

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        torch.jit.trace = counted
        try:
            yield self
        finally:
            torch.jit.trace = original


def loop_stepper(vae, loss_fn):
    """``steps(xs)``: one optimizer step per batch by our training step."""
    optimizer = make_optimizer(vae.parameters(), 1e-3, torch.device("cpu"))

    def steps(xs):
        for x in xs:
            train_step(loss_fn, optimizer, x)
    return steps


def svi_stepper(vae, elbo):
    """``steps(xs)``: one ``SVI.step`` per batch, parameters in Pyro's global store (stock usage)."""
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), elbo)

    def steps(xs):
        for x in xs:
            svi.step(x)
    return steps


#: The methods, by name: a factory taking the VAE and returning ``steps(list of batches)``.
METHODS = {
    "pyro_trace": lambda vae: loop_stepper(vae, PyroELBO(vae, Trace_ELBO())),
    "pyro_meanfield": lambda vae: loop_stepper(vae, PyroELBO(vae, TraceMeanField_ELBO())),
    "svi_trace": lambda vae: svi_stepper(vae, Trace_ELBO()),
    "svi_jit_trace": lambda vae: svi_stepper(vae, JitTrace_ELBO(ignore_jit_warnings=True)),
    "svi_jit_meanfield": lambda vae: svi_stepper(vae, JitTraceMeanField_ELBO(ignore_jit_warnings=True)),
    "svi_jit_meanfield_cached": lambda vae: svi_stepper(vae, CachedJitTraceMeanField_ELBO(ignore_jit_warnings=True)),
    REFERENCE: lambda vae: loop_stepper(vae, ManualELBO(vae, kl="mc")),
}


def make_methods(model_config, names):
    """Each method on its own VAE, all with the parameters of one initialization."""
    torch.manual_seed(0)
    first = build_vae(model_config)
    out = {}
    for name in names:
        vae = build_vae(model_config)  # a new Pyro name each: no two share entries in the param store
        vae.load_state_dict(first.state_dict())
        out[name] = (vae, METHODS[name](vae))
    return out


def bench_batch_size(images, batch_size, rounds, steps, names, model_config, counter, log=print) -> dict:
    """Median seconds per step of each method at one batch size, rounds interleaved."""
    g = torch.Generator().manual_seed(batch_size)
    pick = torch.randint(images.shape[0], (steps, batch_size), generator=g)
    xs = [binarize(images[i], g) for i in pick]  # the same fixed batches for every method
    methods = make_methods(model_config, names)
    next(iter(methods.values()))[0].check_data(xs[0])
    times = {name: [] for name in names}
    traces = {name: 0 for name in names}
    for r in range(rounds + 1):
        for name, (_, step) in methods.items():
            before = counter.count
            start = time.perf_counter()
            step(xs)
            seconds = (time.perf_counter() - start) / steps
            traces[name] += counter.count - before
            if r > 0:  # round 0 warms up and compiles
                times[name].append(seconds)
        if r > 0:
            log(f"batch {batch_size} round {r}: " + "  ".join(f"{n} {t[-1] * 1e3:.1f}" for n, t in times.items())
                + " (ms/step)", flush=True)
    median = {n: statistics.median(t) for n, t in times.items()}
    return {"seconds_per_step": times, "median_seconds_per_step": median,
            "ratio_to_manual": {n: m / median[REFERENCE] for n, m in median.items()},
            "jit_traces": {n: c for n, c in traces.items() if "jit" in n}, "steps_per_round": steps,
            "total_steps": (rounds + 1) * steps}


def profile_pyro_step(images, model_config, steps, top=20) -> str:
    """Where one ``PyroELBO(Trace_ELBO())`` step of ours spends its time at batch 256."""
    (vae, step), = make_methods(model_config, ["pyro_trace"]).values()
    g = torch.Generator().manual_seed(0)
    xs = [binarize(images[torch.randint(images.shape[0], (256,), generator=g)], g) for _ in range(steps)]
    vae.check_data(xs[0])
    step(xs)  # warm up
    with torch.profiler.profile() as prof:
        step(xs)
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    profiler = cProfile.Profile()
    profiler.enable()
    step(xs)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return (f"# torch.profiler, {steps} steps of pyro_trace at batch 256, by self CPU time\n{ops}\n"
            f"# cProfile, {steps} steps of pyro_trace at batch 256, by own time (tottime)\n{text.getvalue()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size (after one warm-up round)")
    p.add_argument("--steps", type=int, default=20, help="steps of each method per round")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256, 2048])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--profile", action="store_true", help="also profile the pyro_trace step at batch 256")
    p.add_argument("--data-dir", default=None)
    add_output_flags(p, out=OUT, smoke="a tiny model, 1 round of 2 steps at batch 32, in seconds")
    args = p.parse_args(argv)
    if REFERENCE not in args.methods:
        args.methods.append(REFERENCE)
    model_config = Config().model
    if args.smoke:
        args.rounds, args.steps, args.batch_sizes = 1, 2, [32]
        model_config = Config().replace(model={"z_dim": 8, "hidden": (64,)}).model
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=".*torch.jit.trace. is deprecated")

    images = load_mnist(args.data_dir, train=True, download=False).images
    counter = TraceCounter()
    results = {}
    # the data are checked once per batch size; after that no method pays for Pyro's checks
    with counter.counting(), pyro.validation_enabled(False):
        for batch_size in args.batch_sizes:
            results[batch_size] = bench_batch_size(images, batch_size, args.rounds, args.steps, args.methods,
                                                   model_config, counter)
    pyro.clear_param_store()  # the SVI methods left their parameters there

    for batch_size, r in results.items():
        print(f"batch {batch_size}:")
        for name, m in r["median_seconds_per_step"].items():
            traced = f"  traced {r['jit_traces'][name]}x in {r['total_steps']} steps" if name in r["jit_traces"] else ""
            print(f"  median step {name:26s} {m * 1e3:8.2f} ms  ratio to {REFERENCE} "
                  f"{r['ratio_to_manual'][name]:5.2f}{traced}")
    with pyro.validation_enabled(False):
        profile = profile_pyro_step(images, model_config, 3 if args.smoke else 10) if args.profile else None
    if profile:
        print(profile)
    with output_folders(args.smoke, args.out, default_out=OUT) as folders:
        folders.out.mkdir(parents=True, exist_ok=True)
        write_json(folders.out / "results.json", {
            "model": "784-400-50 default MNIST VAE" if not args.smoke else "smoke: z_dim 8, hidden 64",
            "rounds": args.rounds, "steps": args.steps, "reference": REFERENCE,
            "batch_sizes": {str(b): r for b, r in results.items()}, **provenance("cpu")})
        if profile:
            (folders.out / "profile.txt").write_text(profile)
        print(f"wrote {folders.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
