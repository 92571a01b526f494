"""The GPU check: one script that, on one GPU machine and inside a wall-clock budget, installs what is
missing, runs the CUDA tests and the speed benchmark, measures IWAE-5000 and training, and writes a
JSON summary and a short table (printed last).

    python tools/gpu_check/run.py --carry gpu_carry --out OUT [--budget-s 420] [--smoke]

``--carry`` is the folder ``prepare.py`` made (wheels and data). The steps, in order; each is timed,
and a step that fails is recorded and the next one runs:

  a. setup        install pyro-ppl from the carried wheels if ``import pyro`` fails; unpack MNIST
  b. environment  GPU name and memory, torch, CUDA, cuDNN, pyro and Python versions
  c. cuda tests   ``python -m pytest -q -m cuda tests``
  d. benchmark    ``experiments/benchmarks/benchmark_speed.py --out OUT/benchmark``, if present
  e. iwae         -log p(x) by IWAE-5000 on the 10,000 MNIST test images, untrained default model:
                  wall time and peak GPU memory, with the library's chunks (chosen for the device) and
                  with hand-set large ones
  f. mnist        ``train_run`` of the default model (its defaults: the step replayed as a CUDA graph)
                  for --epochs epochs (20): seconds per epoch, whole wall time, test -ELBO;
                  its figures and metrics.json go to OUT/mnist_run
  g. distributed  ``torchrun --standalone --nproc_per_node 1 -m pyrovae train --max-steps 50`` (NCCL)
  h. cifar10      ``experiments/configs/cifar10.toml`` (or --cifar-config, such as the stack
                  ``cifar10_ladder_residual.toml``) trained for a time budget (--cifar-s; the number
                  of steps comes from a measured step time) on the carried subset: test bits/dim (ELBO)

Steps that need a GPU are skipped, with the reason, where there is none. With ``--smoke`` every size
is tiny, and e, f, g (gloo) and h also run on the CPU, so that the whole script is exercised there.
Each step runs in a process of its own, under a time limit taken from the budget: a step that hangs
or crashes the GPU takes only itself down. When the budget runs short, the remaining steps are
skipped, saying so. ``OUT/summary.json`` is rewritten after every step; ``OUT/run.log`` holds every
step's output. The device gives back at most 8 files, so when OUT holds more, everything but
summary.json and run.log is packed into ``OUT/artifacts.tar.gz``.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve()
CIFAR_CONFIG = ROOT / "experiments" / "configs" / "cifar10.toml"
BENCHMARK = ROOT / "experiments" / "benchmarks" / "benchmark_speed.py"
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
MAX_FILES = 8  # what the device gives back from its output folder
KEEP_LOOSE = ("summary.json", "run.log")  # never packed
NO_CUDA = "no CUDA device"


class Skip(Exception):
    """The step does not run here; the message says why."""


class StepFailed(Exception):
    """The step ran and failed; the message says how, and ``result`` holds what it measured anyway
    (``figures``, ``details``)."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result or {}


def figure(value, unit: str) -> dict:
    """A measured figure with its unit, as summary.json holds every figure."""
    return {"value": value, "unit": unit}


# --- the steps ------------------------------------------------------------------------------------
class Step(NamedTuple):
    key: str
    name: str
    need_s: float  # the least time it is worth starting with (the steps before keep it back for it)
    cap_s: float | None  # its time limit at most (None: what is left)
    cuda: str | None  # None: runs anywhere; "always": needs a GPU; "smoke": a GPU, or --smoke on the CPU


STEPS = [
    Step("a", "setup", 5, 120, None),
    Step("b", "environment", 2, 60, None),
    Step("c", "cuda tests", 20, 150, "always"),
    Step("d", "benchmark", 30, 150, "always"),
    Step("e", "iwae", 10, 90, "smoke"),
    Step("f", "mnist", 15, 90, "smoke"),
    Step("g", "distributed", 15, 90, "smoke"),
    Step("h", "cifar10", 50, None, "smoke"),  # --cifar-s of training and its overhead, in what is left
]
CIFAR_OVERHEAD_S = 45  # starting, decoding the images, calibrating, the test evaluation, figures


class Check:
    """One run of the check: the output folder, a scratch folder, the environment of the steps'
    processes, the clock, and the summary so far."""

    def __init__(self, args):
        self.args = args
        self.start = time.monotonic()
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.carry = Path(args.carry).resolve()
        self.work = Path(tempfile.mkdtemp(prefix="pyrovae-gpu-check-"))
        self.log = open(self.out / "run.log", "w", buffering=1)
        self.site = self.work / "site"  # where wheels go when the Python environment refuses them
        self.data = self.work / "data"  # the data root the steps read (PYROVAE_DATA)
        self.cuda = False
        self.steps: list[dict] = []
        manifest = self.carry / "MANIFEST.json"
        self.summary = {"command": " ".join(["python", "tools/gpu_check/run.py", *sys.argv[1:]]),
                        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "smoke": args.smoke, "budget_s": args.budget_s, "carry": str(self.carry),
                        "carry_manifest": json.loads(manifest.read_text()) if manifest.is_file() else None,
                        "machine": None, "steps": self.steps}
        sys.path.insert(0, str(ROOT))  # the project, importable without installing it

    # --- time --------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.args.budget_s - self.elapsed()

    # --- the environment of every step's process ------------------------------------------------------
    def env(self) -> dict:
        paths = [str(ROOT)] + ([str(self.site)] if self.site.is_dir() else [])
        if os.environ.get("PYTHONPATH"):
            paths.append(os.environ["PYTHONPATH"])
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYROVAE_DATA": str(self.data),
                "XDG_CACHE_HOME": str(self.work / "cache"), "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
                "PYROVAE_COLLECTIVE_TIMEOUT": "60"}

    def call(self, command: list[str], timeout: float, title: str) -> tuple[int, str]:
        """Run ``command`` from the repository root, its output into run.log; (exit code, output).
        Past ``timeout`` seconds the command and its children are killed and StepFailed is raised."""
        self.log.write(f"\n===== {title}: {' '.join(map(str, command))}  (limit {timeout:.0f} s)\n")
        with tempfile.TemporaryFile("w+", dir=self.work) as output:
            process = subprocess.Popen([str(c) for c in command], cwd=ROOT, env=self.env(), stdout=output,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                code = process.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                code = None
            finally:
                if process.poll() is None:  # timed out or interrupted: end it and what it started
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            output.seek(0)
            text = output.read()
        self.log.write(text[-400_000:])
        self.log.write(f"\n===== {title}: exit code {code}\n")
        if code is None:
            raise StepFailed(f"timed out after {timeout:.0f} s; last output: {last_line(text)}")
        return code, text

    def worker(self, name: str, params: dict, timeout: float) -> dict:
        """Run the step ``name`` in a process of its own (this script with --worker); its result."""
        result = self.work / f"{name}.json"
        command = [sys.executable, SCRIPT, "--worker", name, "--params", json.dumps(params), "--result", result]
        code, text = self.call(command, timeout, name)
        if not result.is_file():
            raise StepFailed(f"exit code {code}: {last_line(text)}")
        return json.loads(result.read_text())

    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    # --- running the steps ---------------------------------------------------------------------------
    def applies(self, needs_cuda) -> str | None:
        """Why a step does not run here (None if it does)."""
        if needs_cuda == "always" and not self.cuda:
            return NO_CUDA
        if needs_cuda == "smoke" and not self.cuda and not self.args.smoke:
            return f"{NO_CUDA} (with --smoke it runs on the CPU, at a tiny size)"
        return None

    def need(self, step: Step) -> float:
        """The least time a step is worth starting with. The CIFAR-10 step on a GPU needs its whole
        --cifar-s and its overhead, so the steps before it leave that much."""
        if step.key == "h" and self.cuda and not self.args.smoke:
            return self.args.cifar_s + CIFAR_OVERHEAD_S
        return step.need_s

    def run_all(self) -> None:
        methods = {"a": self.setup, "b": self.environment, "c": self.cuda_tests, "d": self.benchmark,
                   "e": self.iwae, "f": self.mnist, "g": self.distributed, "h": self.cifar10}
        interrupted = None
        for i, step in enumerate(STEPS):
            row = {"step": step.key, "name": step.name, "status": "skipped", "seconds": 0.0, "reason": None,
                   "key": "", "figures": {}, "details": {}}
            self.steps.append(row)
            # The step's time limit: what is left once the later steps' least needs are kept back, but
            # never less than its own need; a step that does not get even that is skipped.
            later = sum(self.need(s) for s in STEPS[i + 1:] if self.applies(s.cuda) is None)
            limit = max(self.need(step), self.remaining() - later)
            if step.cap_s is not None:
                limit = min(step.cap_s, limit)
            why = interrupted or self.applies(step.cuda)
            if why is None and self.remaining() < self.need(step):
                why = (f"budget: {max(self.remaining(), 0):.0f} s of --budget-s {self.args.budget_s:g} left; "
                       f"this step needs about {self.need(step):g} s")
            if why is not None:
                row["reason"] = f"skipped: {why}"
                self.report(row)
                continue
            print(f"[{step.key}] {step.name} ... (limit {limit:.0f} s)", flush=True)
            began = time.monotonic()
            try:
                result = methods[step.key](limit) or {}
                row.update(status="ok", **result)
            except Skip as e:
                row["reason"] = f"skipped: {e}"
            except StepFailed as e:
                row.update(status="failed", reason=str(e), **e.result)
            except KeyboardInterrupt:
                row.update(status="failed", reason="interrupted")
                interrupted = "the check was interrupted"
            except Exception as e:  # any error of the step is its own, recorded; the check goes on
                row.update(status="failed", reason=f"{type(e).__name__}: {e}")
            row["seconds"] = round(time.monotonic() - began, 2)
            self.report(row)

    def report(self, row: dict) -> None:
        """Say how the step went, and rewrite summary.json (so an interrupted check keeps it)."""
        line = f"[{row['step']}] {row['name']}: {row['status']} ({row['seconds']:.1f} s)"
        if row["reason"]:
            line += f" - {row['reason']}"
        elif row["key"]:
            line += f" - {row['key']}"
        print(line, flush=True)
        self.write_summary()

    def write_summary(self) -> None:
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        self.summary["figures"] = {f"{row['step']}.{row['name']}.{name}": value for row in self.steps
                                   for name, value in row["figures"].items()}  # every figure, in one place
        temporary = self.out / "summary.json.tmp"
        temporary.write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
        os.replace(temporary, self.out / "summary.json")

    # --- a. setup --------------------------------------------------------------------------------
    def setup(self, limit: float) -> dict:
        """The carried MNIST unpacked; pyro-ppl installed from the carried wheels if it is missing.
        The project itself is not installed: the repository root goes on PYTHONPATH (an editable
        install would write into the machine's environment and needs setuptools >= 77 there)."""
        began = time.monotonic()
        unpacked = self.unpack_data()
        figures = {"unpack_seconds": figure(round(time.monotonic() - began, 2), "s")}
        how, details = "already installed", {}
        if not importable("pyro"):
            wheels = self.carry / "wheels"
            if not list(wheels.glob("*.whl")):
                raise StepFailed(f"pyro is not installed and {wheels} holds no wheels (run prepare.py without "
                                 "--no-wheels)")
            # Into this Python's own environment if it takes them; else into a folder of our own, on PYTHONPATH.
            code, text = self.call([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels,
                                    "pyro-ppl"], limit / 2, "pip install")
            how = "pip install --no-index --find-links wheels"
            if code != 0:
                details["pip_install"] = last_line(text)
                code, text = self.call([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                                        "--target", self.site, *sorted(wheels.glob("*.whl"))],
                                       limit / 2, "pip install --target")
                how = f"pip install --target {self.site} (on PYTHONPATH)"
                if code != 0:
                    raise StepFailed(f"pip install failed: {last_line(text)}")
                sys.path.insert(1, str(self.site))
            importlib.invalidate_caches()
        import pyro  # raises if the installation did not take

        import pyrovae  # from the repository root (on sys.path and PYTHONPATH)

        return {"key": f"pyro {pyro.__version__} ({how}); data: {', '.join(unpacked)}", "figures": figures,
                "details": {"pyro": pyro.__version__, "pyro_installed_by": how, "pyrovae_from": pyrovae.__file__,
                            "data_root": str(self.data), "datasets": unpacked, **details}}

    def unpack_data(self) -> list[str]:
        """The data root the steps read: MNIST's idx files unpacked from the carried .gz (or copied),
        and a link to the carried CIFAR-10 folder. Built in the scratch folder, so that the carried
        folder keeps its size."""
        source = self.carry / "data"
        raw = self.data / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name in MNIST_FILES:
            packed, plain = source / "MNIST" / "raw" / f"{name}.gz", source / "MNIST" / "raw" / name
            if packed.is_file():
                with gzip.open(packed, "rb") as f, open(raw / name, "wb") as g:
                    shutil.copyfileobj(f, g, 1 << 20)
            elif plain.is_file():
                shutil.copyfile(plain, raw / name)
            else:
                raise StepFailed(f"MNIST file {name}(.gz) is not in {packed.parent}: run prepare.py")
        found = ["MNIST"]
        if (source / "cifar10" / "train").is_dir() and (source / "cifar10" / "test").is_dir():
            (self.data / "cifar10").symlink_to(source / "cifar10", target_is_directory=True)
            found.append("CIFAR-10 subset")
        return found

    # --- b. environment ----------------------------------------------------------------------------
    def environment(self, limit: float) -> dict:
        import torch

        self.cuda = torch.cuda.is_available()
        info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                "cuda_available": self.cuda}
        figures = {}
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                        compute_capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                        driver=nvidia_smi_driver())
            figures["gpu_memory"] = figure(round(props.total_memory / 2**30, 2), "GiB")
        try:
            import pyro
            from pyrovae.provenance import machine, provenance

            info["pyro"] = pyro.__version__
            self.summary["machine"] = machine()
            info["provenance"] = provenance("cuda" if self.cuda else "cpu")
        except ImportError as e:  # pyro could not be installed: the torch side is still worth having
            info["pyro"] = f"not importable: {e}"
            self.summary["machine"] = {"cpu": platform.processor() or platform.machine(),
                                       "logical_cores": os.cpu_count(), "gpu": info.get("gpu")}
        where = (f"{info['gpu']}, {figures['gpu_memory']['value']} GiB, CUDA {info['cuda']}" if self.cuda
                 else f"{NO_CUDA}: CPU")
        return {"key": f"{where}; torch {info['torch']}, pyro {info['pyro']}", "figures": figures, "details": info}

    # --- c. the cuda tests ---------------------------------------------------------------------------
    def cuda_tests(self, limit: float) -> dict:
        if not importable("pytest"):
            raise Skip("pytest is not installed on this machine")
        code, text = self.call([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests", "-p", "no:cacheprovider"],
                               limit, "pytest -m cuda")
        counts = pytest_counts(text)
        failures = [line for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))][:30]
        figures = {k: figure(v, "tests") for k, v in counts.items()}
        details = {"exit_code": code, "failures": failures, "last_line": last_line(text)}
        if code == 5:
            raise Skip("no test is marked cuda (pytest exit code 5)")
        if code != 0:
            raise StepFailed(f"pytest exit code {code}: {last_line(text)}", {"figures": figures, "details": details})
        return {"key": last_line(text), "figures": figures, "details": details}

    # --- d. the speed benchmark ------------------------------------------------------------------
    def benchmark(self, limit: float) -> dict:
        if not BENCHMARK.is_file():
            raise Skip(f"not present ({BENCHMARK.relative_to(ROOT)})")
        out = self.out / "benchmark"
        extra = ["--smoke"] if self.args.smoke else []
        code, text = self.call([sys.executable, BENCHMARK, "--out", out, "--device", "cuda", *extra,
                                *self.args.benchmark_args.split()], limit, "benchmark")
        tail = [line for line in text.splitlines() if line.strip()][-40:]
        written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.is_dir() else []
        details = {"files": written, "output_tail": tail}
        if code != 0:
            raise StepFailed(f"exit code {code}: {last_line(text)}", {"details": details})
        return {"key": f"{len(written)} files in benchmark/", "figures": {}, "details": details}

    # --- e. IWAE-5000 ------------------------------------------------------------------------------
    def iwae(self, limit: float) -> dict:
        smoke = self.args.smoke
        params = {"device": self.device(), "k": 5 if smoke else self.args.particles, "images": 100 if smoke else None,
                  "seconds": limit,
                  # (images per batch, decoder rows per chunk): the library's defaults, then larger chunks
                  "variants": [[None, None], [1000, 262144]] if self.cuda else [[None, None]]}
        result = self.worker("iwae", params, limit)
        first = result["variants"][0]
        figures = {}
        for v in result["variants"]:
            name = f"batch{v['batch_size']}_rows{v['max_rows']}"
            figures[f"{name}_seconds"] = figure(v["seconds"], "s")
            figures[f"{name}_peak_memory"] = figure(v["peak_memory_mib"], memory_unit(result["device"]))
            figures[f"{name}_neg_log_likelihood"] = figure(v["neg_log_likelihood"], "nats per image")
        best = min(result["variants"], key=lambda v: v["seconds"])
        key = (f"IWAE-{result['k']}, {result['images']} images: {first['seconds']:.2f} s (library chunks), "
               f"best {best['seconds']:.2f} s, peak {best['peak_memory_mib']:.0f} MiB; "
               f"{first['neg_log_likelihood']:.2f} nats")
        return {"key": key, "figures": figures, "details": result}

    # --- f. training on MNIST ----------------------------------------------------------------------
    def mnist(self, limit: float) -> dict:
        smoke = self.args.smoke
        params = {"device": self.device(), "epochs": 1 if smoke else self.args.epochs,
                  "train_subset": 1000 if smoke else None, "test_subset": 256 if smoke else None,
                  "copy_to": str(self.out / "mnist_run")}
        result = self.worker("mnist", params, limit)
        epochs = result["epochs"]
        figures = {"epoch_seconds": figure([e["seconds"] for e in epochs], "s per epoch"),
                   "test_neg_elbo": figure(epochs[-1]["test_neg_elbo"], "nats per image"),
                   "train_neg_elbo": figure(epochs[-1]["train_neg_elbo"], "nats per image"),
                   "wall_seconds": figure(result["wall_seconds"], "s"),
                   "peak_memory": figure(result["peak_memory_mib"], memory_unit(result["device"]))}
        per_epoch = "/".join(f"{e['seconds']:.2f}" for e in epochs)
        key = (f"{len(epochs)} epoch{'s' if len(epochs) != 1 else ''} of {result['train_images']} images: "
               f"{per_epoch} s; test -ELBO {epochs[-1]['test_neg_elbo']:.2f} nats")
        return {"key": key, "figures": figures, "details": result}

    # --- g. torchrun ------------------------------------------------------------------------------
    def distributed(self, limit: float) -> dict:
        run = self.work / "distributed_run"
        steps = 2 if self.args.smoke else 50
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   "-m", "pyrovae", "train", "--out", run, "--max-steps", steps, "--epochs", "1", "--quiet",
                   "--device", self.device()]
        if self.args.smoke:
            command += ["--train-subset", "512", "--test-subset", "256"]
        began = time.monotonic()
        code, text = self.call(command, limit, "torchrun")
        seconds = time.monotonic() - began
        if code != 0:
            raise StepFailed(f"torchrun exit code {code}: {last_line(text)}")
        metrics = json.loads((run / "metrics.json").read_text())
        world_size = metrics.get("world_size")
        done = metrics.get("stopped_at_step") or metrics["epochs"][-1]["steps"]  # inside an epoch, or at its end
        if world_size != 1:
            raise StepFailed(f"metrics.json says world_size {world_size}, expected 1")
        backend = "nccl" if self.cuda else "gloo"
        loss = (metrics.get("partial_epoch") or (metrics["epochs"] or [{}])[-1]).get("train_neg_elbo")
        return {"key": f"world_size {world_size} ({backend}), {done} steps, {seconds:.1f} s with startup",
                "figures": {"wall_seconds": figure(round(seconds, 2), "s"), "steps": figure(done, "steps"),
                            "train_neg_elbo": figure(loss, "nats per image")},
                "details": {"world_size": world_size, "backend": backend, "device": metrics.get("device"),
                            "command": " ".join(map(str, command))}}

    # --- h. CIFAR-10 --------------------------------------------------------------------------------
    def cifar10(self, limit: float) -> dict:
        if not (self.data / "cifar10").is_dir():
            raise Skip("no CIFAR-10 in the carried folder (prepare.py found none)")
        smoke = self.args.smoke
        seconds = 3.0 if smoke else min(self.args.cifar_s, limit - CIFAR_OVERHEAD_S)
        if seconds < 5 and not smoke:
            raise Skip(f"budget: {limit:.0f} s left, not enough to train")
        # smoke: one logistic per pixel instead of ten (the figures of ten cost seconds on a CPU)
        overrides = ["train.batch_size=16", "train.test_subset=50",
                     "model.likelihood_options.components=1"] if smoke else []
        timeout = min(limit, seconds + CIFAR_OVERHEAD_S * 2)
        params = {"config": str(Path(self.args.cifar_config).resolve()), "device": self.device(), "train_seconds": seconds, "timeout_s": timeout, "overrides": overrides,
                  "warmup_steps": 1 if smoke else 5, "calibration_steps": 1 if smoke else 20,
                  "max_steps": 3 if smoke else None, "copy_to": str(self.out / "cifar10_run")}
        result = self.worker("cifar10", params, timeout)
        figures = {"step_seconds": figure(result["step_seconds"], "s per step"),
                   "steps": figure(result["steps"], "steps"), "epochs": figure(result["epochs"], "epochs"),
                   "train_seconds": figure(result["train_seconds"], "s"),
                   "test_bits_per_dim": figure(result["test_bits_per_dim"], "bits/dim (ELBO)"),
                   "peak_memory": figure(result["peak_memory_mib"], memory_unit(result["device"]))}
        key = (f"{result['steps']} steps ({result['epochs']:.1f} epochs of {result['train_images']} images), "
               f"{result['train_seconds']:.0f} s in train_run: {result['test_bits_per_dim']:.3f} bits/dim "
               f"(ELBO, {result['test_images']} test images)")
        return {"key": key, "figures": figures, "details": result}

    # --- i. the end ------------------------------------------------------------------------------
    def finish(self) -> None:
        """Pack the output if the device would not give it all back, write the summary, print the table."""
        packed = pack(self.out)
        if packed:
            self.summary["packed"] = {"archive": "artifacts.tar.gz", "files": packed}
            print(f"packed {len(packed)} files into {self.out / 'artifacts.tar.gz'} (tar xzf artifacts.tar.gz)")
        self.summary["total_seconds"] = round(self.elapsed(), 1)
        self.write_summary()
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)
        print(table(self.steps, self.summary), flush=True)


def importable(module: str) -> bool:
    """Whether ``module`` imports (in this process, whose sys.path the steps' PYTHONPATH mirrors)."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def pytest_counts(text: str) -> dict:
    """The counts in pytest's closing line: passed, failed, skipped, deselected, errors..."""
    counts = {}
    for line in reversed(text.splitlines()[-5:]):
        for number, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", line):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(number)
        if counts:
            break
    return counts


def nvidia_smi_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def pack(out: Path) -> list[str]:
    """If ``out`` holds more files than the device gives back, or files deeper than two folders, put
    all but summary.json and run.log into artifacts.tar.gz; the packed paths."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    deep = any(len(p.relative_to(out).parts) > 3 for p in files)
    if len(files) <= MAX_FILES and not deep:
        return []
    packed = [p for p in files if p.relative_to(out).as_posix() not in KEEP_LOOSE]
    with tarfile.open(out / "artifacts.tar.gz.tmp", "w:gz") as archive:
        for p in packed:
            archive.add(p, arcname=p.relative_to(out).as_posix())
    for p in packed:
        p.unlink()
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()
    os.replace(out / "artifacts.tar.gz.tmp", out / "artifacts.tar.gz")
    return [p.relative_to(out).as_posix() for p in packed]


def table(steps: list[dict], summary: dict) -> str:
    """The closing table: one line per step, then the total."""
    lines = ["", "step              status   seconds  key figure", "-" * 100]
    for row in steps:
        text = row["key"] if row["status"] == "ok" else (row["reason"] or "")
        lines.append(f"{row['step']}. {row['name']:14s} {row['status']:8s} {row['seconds']:7.1f}  {text}")
    gpu = (summary.get("machine") or {}).get("gpu") or "no GPU"
    lines.append("-" * 100)
    lines.append(f"total {summary['total_seconds']:.1f} s of --budget-s {summary['budget_s']:g} on {gpu}; "
                 f"summary.json in the output folder")
    return "\n".join(lines)


# --- the steps that run in processes of their own ----------------------------------------------------
def peak_memory_mib(device) -> float:
    """The step's peak memory (MiB): on a GPU what torch allocated there (since the last reset of
    its peak), on the CPU the process's peak resident set (torch and the data included)."""
    import resource

    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1)  # KiB on Linux


def memory_unit(device: str) -> str:
    return "MiB (GPU, torch.cuda.max_memory_allocated)" if device.startswith("cuda") else \
        "MiB (process peak resident set)"


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_iwae(p: dict) -> dict:
    """IWAE-K of the untrained default model on the MNIST test set, per chunking: seconds, peak memory."""
    started = time.perf_counter()
    import torch

    from pyrovae import Config, build_vae
    from pyrovae.data import prepare_test
    from pyrovae.evaluate import importance_log_likelihood, iwae_chunks

    device = torch.device(p["device"])
    config = Config()
    torch.manual_seed(0)
    vae = build_vae(config.model).to(device).eval()
    test, _ = prepare_test(config, device)
    test = test[: p["images"]] if p["images"] else test
    importance_log_likelihood(vae, test[:100], k=10, batch_size=100)  # warm-up: kernels, allocator
    variants = []
    for batch_size, max_rows in p["variants"]:
        if batch_size is None:  # the library's own choice for this device, recorded
            batch_size, max_rows = iwae_chunks(vae, test)
        spent = time.perf_counter() - started
        if variants and spent + 1.5 * variants[0]["seconds"] + 10 > p["seconds"]:
            break  # another variant would not fit the step's time limit
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        result = importance_log_likelihood(vae, test, k=p["k"], batch_size=batch_size, max_rows=max_rows)
        sync(device)
        seconds = time.perf_counter() - began
        variants.append({"batch_size": batch_size, "max_rows": max_rows, "seconds": round(seconds, 3),
                         "peak_memory_mib": peak_memory_mib(device),
                         "neg_log_likelihood": result["neg_log_likelihood"], "neg_elbo": result["neg_elbo"],
                         "decoder_rows_per_second": round(p["k"] * len(test) / seconds)})
    return {"k": p["k"], "images": len(test), "device": str(device), "model": "default, untrained (seed 0)",
            "variants": variants}


def worker_mnist(p: dict) -> dict:
    """The default model trained with train_run in a scratch folder; its figures and metrics copied out."""
    import torch

    from pyrovae import Config, train_run

    device = torch.device(p["device"])
    config = Config().replace(train={"epochs": p["epochs"], "device": p["device"], "train_subset": p["train_subset"],
                                     "test_subset": p["test_subset"]})
    with tempfile.TemporaryDirectory() as scratch:
        began = time.perf_counter()
        notes = []
        run = train_run(config, Path(scratch) / "run", quiet=True, log=notes.append)
        wall = time.perf_counter() - began
        copy_outputs(Path(scratch) / "run", Path(p["copy_to"]))
    return {"epochs": run.metrics["epochs"], "wall_seconds": round(wall, 2), "peak_memory_mib": peak_memory_mib(device),
            "train_images": int(run.data.train.shape[0]), "test_images": int(run.data.test.shape[0]),
            "objective": config.train.objective, "cuda_graph": config.train.cuda_graph, "notes": notes,
            "device": str(device)}


def worker_cifar10(p: dict) -> dict:
    """The CIFAR-10 config trained for a time budget: the step time measured on a few steps first,
    then ``train_run`` with ``train.max_steps`` set to what fits (and ``train.max_seconds`` as a safety
    net); test bits/dim by the ELBO."""
    started = time.perf_counter()
    import pyro
    import torch

    from pyrovae import Config, build_vae, train_run, train_step
    from pyrovae.data import prepare_data
    from pyrovae.engine import make_optimizer
    from pyrovae.evaluate import evaluate
    from pyrovae.objectives import build_objective

    device = torch.device(p["device"])
    config = Config.load(p["config"], [*p["overrides"], f"train.device={p['device']}"])
    data = prepare_data(config, device)
    batch_size = config.train.batch_size

    # The step time, on a model of our own (the run's model is built afresh by train_run).
    with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):
        vae = build_vae(config.model, tuple(data.train.shape[1:])).to(device)
        loss_fn = build_objective(config.train.objective, vae, config.train.particles,
                                  implementation=config.train.implementation)
        optimizer = make_optimizer(vae.parameters(), config.train.lr, device)
        generator = torch.Generator(device=device).manual_seed(0)
        x = data.per_batch(data.train[:batch_size], generator) if data.per_batch else data.train[:batch_size]
        for _ in range(p["warmup_steps"]):  # kernel selection, the allocator
            train_step(loss_fn, optimizer, x)
        sync(device)
        began = time.perf_counter()
        for _ in range(p["calibration_steps"]):
            train_step(loss_fn, optimizer, x)
        sync(device)
        step_seconds = (time.perf_counter() - began) / p["calibration_steps"]
    del vae, loss_fn, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    steps = max(1, int(p["train_seconds"] / step_seconds))
    if p["max_steps"]:
        steps = min(steps, p["max_steps"])
    n = data.train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    # A safety net for the step count (the per-epoch test evaluations and checkpoints were not in
    # the measured step time): train.max_seconds stops the loop past a deadline, with a checkpoint.
    # The deadline leaves 15 s of the process's time limit for the test evaluation and the figures.
    deadline = min(p["train_seconds"] * 1.25 + 10, p["timeout_s"] - (time.perf_counter() - started) - 15)
    config = config.replace(train={"max_steps": steps, "epochs": math.ceil(steps / steps_per_epoch),
                                   "max_seconds": max(deadline, 1.0)})
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "run"
        began = time.perf_counter()
        vae = train_run(config, folder, data=data, quiet=True).vae
        sync(device)
        train_wall = time.perf_counter() - began
        metrics = json.loads((folder / "metrics.json").read_text())
        done = metrics.get("stopped_at_step") or metrics["epochs"][-1]["steps"]
        stopped_by = "train.max_steps" if done >= steps else "train.max_seconds"
        steps = done
        test = evaluate(vae, data.test, seed=config.data.test_binarization_seed)
        copy_outputs(folder, Path(p["copy_to"]))
    return {"step_seconds": round(step_seconds, 5), "steps": steps, "epochs": round(steps / steps_per_epoch, 2),
            "stopped_by": stopped_by, "train_seconds": round(train_wall, 1),
            "train_seconds_budget": round(p["train_seconds"], 1),
            "test_bits_per_dim": test["bits_per_dim"], "test_neg_elbo": test["neg_elbo"],
            "test_images": int(data.test.shape[0]), "train_images": int(n), "batch_size": batch_size,
            "epoch_rows": metrics["epochs"], "peak_memory_mib": peak_memory_mib(device), "device": str(device),
            "config": p["config"], "overrides": p["overrides"]}


def copy_outputs(run: Path, dest: Path) -> None:
    """A run's figures and metrics.json (not its checkpoint) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in [*sorted(run.glob("*.png")), run / "metrics.json"]:
        if f.is_file():
            shutil.copyfile(f, dest / f.name)


WORKERS = {"iwae": worker_iwae, "mnist": worker_mnist, "cifar10": worker_cifar10}


def worker_main(args) -> int:
    """Run one step in this process; its result (a JSON object) goes to --result."""
    sys.path.insert(0, str(ROOT))
    from pyrovae.atomic import write_json

    write_json(args.result, WORKERS[args.worker](json.loads(args.params)))
    return 0


# --- the command line ----------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--carry", default="gpu_carry", help="the folder prepare.py made (default gpu_carry)")
    p.add_argument("--out", help="output folder: summary.json, run.log, figures (required)")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole check (420 s)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes; on the CPU, run e-h there too")
    p.add_argument("--epochs", type=int, default=20, help="MNIST training epochs (step f; default 20)")
    p.add_argument("--particles", type=int, default=5000, help="K for IWAE (step e; default 5000)")
    p.add_argument("--cifar-s", type=float, default=120.0, help="CIFAR-10 training seconds at most (step h; 120)")
    p.add_argument("--cifar-config", type=Path, default=CIFAR_CONFIG,
                   help="the CIFAR-10 config step h trains (default experiments/configs/cifar10.toml)")
    p.add_argument("--benchmark-args", default="", help="more arguments for benchmark_speed.py, in one string")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if not args.out:
        p.error("--out is required")
    if not Path(args.carry).is_dir():
        p.error(f"no carried folder at {args.carry}: run tools/gpu_check/prepare.py first")
    if not args.cifar_config.is_file():
        p.error(f"no config file at --cifar-config {args.cifar_config}")

    check = Check(args)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM still ends with the summary and the table
    try:
        check.run_all()
    except KeyboardInterrupt:
        print("interrupted: the steps not begun are left out of the summary", flush=True)
    finally:
        check.finish()
    return 0 if all(row["status"] != "failed" for row in check.steps) else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
