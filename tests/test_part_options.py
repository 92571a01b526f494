"""Part options: every option of every registered part, given 0, a negative value or a value of the wrong
type on the command line, ends in a run (where the value is valid) or in one message naming the field,
never in a traceback; integers given for float options arrive as floats.

The registries are iterated, so a new part or option is covered with no edit here. The command-line
cases run in one subprocess, this file run as a script, which calls ``pyrovae.cli.main`` for each case in
turn and keeps its exit code and stderr: one interpreter start, and a training run only where a value is
valid. An exception that escapes ``main`` is what a user would see as a traceback; it is written to the
case's stderr as Python would write it.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import traceback
import types
import typing
from pathlib import Path

import pytest
import torch

from pyrovae.config import Config, ConfigError, ModelConfig, OptionError, apply_overrides
from pyrovae.parts import part_options, resolve_parts
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.build import build_vae
from pyrovae.networks import NETWORKS
from pyrovae.plugins import load_plugins
from pyrovae.posteriors import POSTERIORS
from pyrovae.priors import PRIORS, FlowPrior

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"prior": PRIORS, "likelihood": LIKELIHOODS, "posterior": POSTERIORS, "network": NETWORKS}
#: One optimizer step on 64 MNIST images, evaluated on 64: the run a valid value gets.
QUICK = ["--dataset", "mnist", "--max-steps", "1", "--epochs", "1", "--train-subset", "64", "--test-subset", "64",
         "--batch-size", "32", "--quiet"]
#: The three values every option meets: (what, as typed after --set ...=).
BASE = [("zero", "0"), ("negative", "-2"), ("wrong type", "x")]


def _mentions(annotation, test) -> bool:
    """Whether ``annotation`` or a member of it (a union's) satisfies ``test``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_mentions(a, test) for a in typing.get_args(annotation))
    return test(annotation)


def _values(annotation) -> list[tuple[str, str]]:
    """The values an option meets: the three of ``BASE``, then more by its annotation: a fraction and
    non-finite numbers for a float, bad entries for a list."""
    values = list(BASE)
    if _mentions(annotation, lambda a: a is float):
        values += [("negative fraction", "-0.5"), ("not a number", "nan"), ("infinite", "inf")]
    if _mentions(annotation, lambda a: typing.get_origin(a) in (tuple, list)):
        values += [("zero entry", "[0]"), ("negative entry", "[-2]"), ("empty list", "[]"), ("text entry", '["x"]')]
    return values


def option_cases(out_root: Path) -> list[dict]:
    """Every (part, option, value) case: the flags after ``pyrovae train`` and what to check."""
    load_plugins()  # installed parts (entry points) too
    cases = []
    for kind, registry in KINDS.items():
        for name, target in sorted(registry.items()):
            for key, param in (part_options(kind, target) or {}).items():
                for what, text in _values(param.annotation):
                    out = out_root / f"{kind}-{name}-{key}-{len(cases)}"
                    flags = [f"--{kind}", name, "--set", f"model.{kind}_options.{key}={text}"]
                    cases.append({"kind": kind, "name": name, "key": key, "what": what, "flags": flags,
                                  "out": str(out)})
    return cases


def run_cases(cases: list[dict], data_root: str) -> list[dict]:
    """Run ``pyrovae train FLAGS --out OUT ...`` in this process for each case: exit code and stderr."""
    from pyrovae.cli import main

    results = []
    for case in cases:
        argv = ["train", *case["flags"], "--out", case["out"], "--data-dir", data_root, *QUICK]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()  # what the user would see
                code = 1
        results.append({"code": code, "stderr": err.getvalue()})
    return results


def problem(case: dict, result: dict) -> str | None:
    """What is wrong with a case's outcome, or None: a valid value runs to the end (samples drawn); any
    other ends in exactly one error line naming the field, with no traceback and no run folder."""
    label, err, out = " ".join(case["flags"]), result["stderr"], Path(case["out"])
    if "Traceback" in err:
        return f"{label}: a traceback\n{err[-2000:]}"
    if result["code"] == 0:
        return None if (out / "samples.png").is_file() else f"{label}: exit 0 without samples.png"
    field = f"model.{case['kind']}_options.{case['key']}"
    errors = [line for line in err.splitlines() if "error:" in line]
    if len(errors) != 1 or field not in errors[0]:
        return f"{label}: exit {result['code']}; expected one error line naming {field}, got:\n{err[-2000:]}"
    if out.exists():
        return f"{label}: refused, but a run folder was left at {out}"
    return None


def readme_plugin_source() -> str:
    """The README's example prior, the Python block that defines ``LogisticPrior``, as written."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    (block,) = [b for b in blocks if "class LogisticPrior" in b]
    return block


@pytest.mark.mnist
@pytest.mark.slow
def test_every_option_value_ends_in_a_run_or_one_message_naming_the_field(tmp_path, mnist_root, record_property):
    cases = option_cases(tmp_path / "runs")
    (tmp_path / "readme_logistic.py").write_text(readme_plugin_source())
    readme = ["--plugin", "readme_logistic", "--prior", "logistic", "--set", "model.prior_options.scale=2"]
    cases.append({"kind": "prior", "name": "logistic", "key": "scale", "what": "an integer for a float",
                  "flags": readme, "out": str(tmp_path / "runs" / "readme-logistic")})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    result = subprocess.run([sys.executable, __file__, str(tmp_path / "cases.json"), str(mnist_root),
                             str(tmp_path / "results.json")], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "default"}, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == len(cases)
    problems = [p for p in map(problem, cases, results) if p]
    ran = sum(r["code"] == 0 for r in results)
    base = sum(c["what"] in dict(BASE) for c in cases)
    options = len({(c["kind"], c["name"], c["key"]) for c in cases[:-1]})
    summary = (f"{len(cases)} option cases checked: {options} options x 3 ({base} zero / negative / wrong type), "
               f"{len(cases) - 1 - base} more by type, 1 README plugin; {ran} ran, {len(cases) - ran} refused")
    print(summary)
    record_property("option_cases", summary)
    assert base == 3 * options and results[-1]["code"] == 0
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n\n".join(problems)


# --- integers for float options --------------------------------------------------------------------
def test_the_readme_plugin_takes_an_integer_scale_as_a_float_and_samples(monkeypatch):
    monkeypatch.setitem(PRIORS, "logistic", None)  # the README's block replaces it; removed afterwards
    exec(readme_plugin_source(), {})
    config = Config.from_dict(apply_overrides({}, ["model.prior=logistic", "model.prior_options.scale=2",
                                                   "model.z_dim=3", "model.hidden=[16]"]))
    options = resolve_parts(config.model).options["prior"]
    assert options == {"scale": 2.0} and type(options["scale"]) is float
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    vae = build_vae(config.model)
    assert vae.prior.scale.dtype == torch.get_default_dtype()
    samples = vae.sample(5)
    assert samples.shape == (5, 1, 28, 28) and torch.isfinite(samples).all()


def test_registered_parts_get_floats_for_float_options_and_keep_integers():
    config = ModelConfig(z_dim=3, hidden=(16,), prior="flow", prior_options={"bins": 4, "bound": 2, "flows": 1},
                         likelihood="normal", likelihood_options={"scale": "fixed", "scale_value": 1})
    options = resolve_parts(config).options
    assert options["prior"] == {"bins": 4, "bound": 2.0, "flows": 1}
    assert [type(v) for v in options["prior"].values()] == [int, float, int]
    assert type(options["likelihood"]["scale_value"]) is float
    vae = build_vae(config)
    assert torch.isfinite(vae.sample(4)).all()
    student = ModelConfig(prior="student_t", prior_options={"df": 5})
    assert type(resolve_parts(student).options["prior"]["df"]) is float
    assert build_vae(student).prior.df.dtype == torch.get_default_dtype()


class _Weighted(torch.nn.Module):
    """A part with float options of several annotations, for the conversion alone."""

    def __init__(self, z_dim: int, weights: tuple[float, ...] = (1.0,), temperature: float | None = None,
                 count: int | float = 1, flag: bool = False):
        super().__init__()


def test_integers_become_floats_in_unions_and_lists_but_booleans_do_not(monkeypatch):
    monkeypatch.setitem(PRIORS, "weighted", _Weighted)
    options = resolve_parts(ModelConfig(prior="weighted", prior_options={
        "weights": [1, 2.5], "temperature": 2, "count": 3, "flag": True})).options["prior"]
    assert options == {"weights": [1.0, 2.5], "temperature": 2.0, "count": 3, "flag": True}
    assert [type(w) for w in options["weights"]] == [float, float] and type(options["count"]) is int
    for bad in ({"temperature": True}, {"weights": [1, False]}):
        with pytest.raises(ConfigError, match=f"model.prior_options.{next(iter(bad))} must be"):
            resolve_parts(ModelConfig(prior="weighted", prior_options=bad))
    with pytest.raises(ConfigError, match="model.prior_options.df must be a number, got True"):
        resolve_parts(ModelConfig(prior="student_t", prior_options={"df": True}))


# --- the messages ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,needle", [
    ({"bins": 0}, "model.prior 'flow': model.prior_options.bins must be an integer from 1 to 1000"),
    ({"bins": -2}, "model.prior_options.bins must be an integer from 1 to 1000 (spline segments per coordinate"),
    ({"bins": 1001}, "model.prior_options.bins must be an integer from 1 to 1000"),
    ({"bound": 0}, "model.prior_options.bound must be a positive finite number"),
    ({"bound": -1}, "model.prior_options.bound must be a positive finite number"),
    ({"bound": float("inf")}, "model.prior_options.bound must be a positive finite number"),
    ({"hidden": []}, "model.prior_options.hidden must be one or more layer widths of at least 3"),
    ({"hidden": [2]}, "model.prior_options.hidden must be one or more layer widths of at least 3"),
])
def test_the_flow_prior_names_the_field_it_refuses(options, needle):
    with pytest.raises(ConfigError) as info:
        build_vae(ModelConfig(z_dim=3, hidden=(16,), prior="flow", prior_options=options))
    assert needle in str(info.value)


def test_a_part_built_directly_raises_an_option_error_naming_the_option():
    with pytest.raises(OptionError, match=r"^bins must be an integer from 1 to 1000") as info:
        FlowPrior(3, bins=0)
    assert info.value.option == "bins" and isinstance(info.value, ValueError)


def test_a_large_learned_scale_starts_where_asked():
    likelihood = build_vae(ModelConfig(z_dim=2, hidden=(8,), likelihood="normal",
                                       likelihood_options={"scale_value": 1000})).likelihood
    scale = torch.nn.functional.softplus(likelihood.raw_scale) + likelihood.min_scale
    assert scale.item() == pytest.approx(1000.0)


if __name__ == "__main__":  # the subprocess of the first test: CASES.json DATA_ROOT RESULTS.json
    results = run_cases(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
    Path(sys.argv[3]).write_text(json.dumps(results))
