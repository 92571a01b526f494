"""The prepared GPU check (tools/gpu_check) runs end to end on the CPU: prepare.py makes a
small carried folder from the shared data, run.py --smoke goes through every step (those that need
CUDA skipped, saying why; the others at a tiny size on the CPU), writes summary.json and prints its
table last."""

import json
import subprocess
import sys
import tarfile

from helpers import ROOT

STEPS = ["setup", "environment", "cuda tests", "benchmark", "iwae", "mnist", "distributed", "cifar10"]
NEED_CUDA = {"cuda tests", "benchmark"}


def test_gpu_check_smoke_on_the_cpu(mnist_root, tmp_path):
    carry, out = tmp_path / "carry", tmp_path / "out"
    prepared = subprocess.run([sys.executable, "tools/gpu_check/prepare.py", "--no-wheels", "--out", str(carry),
                               "--data-dir", str(mnist_root), "--cifar-train-per-class", "20",
                               "--cifar-test-per-class", "10"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    manifest = json.loads((carry / "MANIFEST.json").read_text())
    assert "wheels" not in manifest["contents"] and manifest["contents"]["mnist"]["files"] == 4
    assert sorted(p.name for p in (carry / "data" / "MNIST" / "raw").iterdir()) == sorted(
        f"{name}.gz" for name in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
                                  "train-labels-idx1-ubyte"])

    # what travels is the archive beside the folder: the check runs on what it unpacks to
    with tarfile.open(tmp_path / "carry.tar.gz") as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    carry = tmp_path / "unpacked" / "carry"
    assert json.loads((carry / "MANIFEST.json").read_text()) == manifest
    ladder = "experiments/configs/cifar10_ladder_residual.toml"  # step h trains the stack, as a GPU check may
    done = subprocess.run([sys.executable, "tools/gpu_check/run.py", "--smoke", "--carry", str(carry),
                           "--out", str(out), "--cifar-config", ladder], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {row["name"]: row for row in summary["steps"]}
    assert list(steps) == STEPS
    cuda, cifar = summary["machine"]["gpu"] is not None, (mnist_root / "cifar10").is_dir()
    for name, row in steps.items():
        assert row["status"] in ("ok", "skipped"), (name, row["reason"])
        if row["status"] == "skipped":
            assert row["reason"].startswith("skipped: ") and len(row["reason"]) > len("skipped: "), name
        if not cuda:  # on the CPU: what needs CUDA is skipped, the rest runs at a tiny size
            skipped = name in NEED_CUDA or (name == "cifar10" and not cifar)
            assert (row["status"] == "skipped") == skipped, (name, row["reason"])
        if name in NEED_CUDA and not cuda:
            assert "no CUDA device" in row["reason"]
    # every figure comes with its unit
    assert summary["figures"] and all(set(f) == {"value", "unit"} and f["unit"] for f in summary["figures"].values())
    assert steps["distributed"]["details"]["world_size"] == 1
    if cifar:
        assert 0 < steps["cifar10"]["figures"]["test_bits_per_dim"]["value"] < 16
        assert steps["cifar10"]["details"]["config"] == str(ROOT / ladder)

    # the figures of the MNIST run come back, loose or packed (the device returns at most 8 files)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8
    names = {p.relative_to(out).as_posix() for p in files}
    if "artifacts.tar.gz" in names:
        with tarfile.open(out / "artifacts.tar.gz") as archive:
            names |= set(archive.getnames())
    assert {"mnist_run/reconstructions.png", "mnist_run/metrics.json", "run.log"} <= names

    # the table is the last thing printed: its header, one line per step in order, then the total
    lines = done.stdout.rstrip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("step ") and "status" in line)
    rows = [line for line in lines[header + 1:] if line[:2] in {f"{c}." for c in "abcdefgh"}]
    assert [line[3:].split("  ")[0].strip() for line in rows] == STEPS
    assert lines[-1].startswith("total ") and lines[-2].startswith("---")


def test_a_missing_cifar_config_is_refused_before_anything_runs(tmp_path):
    done = subprocess.run([sys.executable, "tools/gpu_check/run.py", "--carry", str(tmp_path), "--out",
                           str(tmp_path / "out"), "--cifar-config", "experiments/configs/no_such.toml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no config file at --cifar-config experiments/configs/no_such.toml" in done.stderr
    assert not (tmp_path / "out").exists()
