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


