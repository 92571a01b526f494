"""The ELBO comparison and the per-step benchmark run end to end under --smoke."""

import json

from helpers import run_smoke


def test_compare_elbo_smoke(mnist_root, tmp_path):
    out = run_smoke("studies/compare_elbo.py", mnist_root, "--out", str(tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    methods = {"trace_elbo", "meanfield_elbo", "manual_analytic", "manual_mc"}
    assert len(metrics["history"]) == metrics["epochs"] == 2
    for row in metrics["history"]:
        assert set(row) == methods | {"epoch"}
        for values in row.values():
            if isinstance(values, dict):
                assert values["seconds"] > 0 and 0 < values["test_neg_elbo"] < 1000
    # twins compute the same estimator from the same start, data and noise
    for pair, gap in metrics["summary"]["twin_max_abs_test_gap"].items():
        assert gap < 1e-2, pair
    # the closed-form KL removes noise from the encoder's gradient
    for when, v in metrics["gradient_variance"].items():
        assert v["mc"]["total_variance"] > v["analytic"]["total_variance"] > 0, when
    assert metrics["command"].startswith("compare_elbo.py --smoke")
    assert (tmp_path / "test_neg_elbo.png").is_file() and (tmp_path / "seconds_per_epoch.png").is_file()
    assert "encoder gradient variance (initial)" in out


def test_benchmark_step_smoke(mnist_root, tmp_path):
    out = run_smoke("benchmarks/benchmark_step.py", mnist_root, "--out", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    r = results["batch_sizes"]["32"]
    assert r["ratio_to_manual"]["manual"] == 1.0
    assert all(t > 0 for t in r["median_seconds_per_step"].values())
    # the shipped JitTraceMeanField_ELBO traces on every step; the cached variant and JitTrace_ELBO once
    assert r["jit_traces"] == {"svi_jit_trace": 1, "svi_jit_meanfield": r["total_steps"],
                               "svi_jit_meanfield_cached": 1}
    assert "ratio to manual" in out
