"""Make the folder that travels with the GPU check (``run.py``) to a GPU machine.

A typical GPU image has torch, torchvision, matplotlib and tqdm but not pyro-ppl, and may reach no
package index; nor does it hold our data. This script gathers, into one folder (``gpu_carry/`` by
default, ignored by git):

- ``wheels/``: pyro-ppl, pyro-api and opt-einsum as wheels, fetched with ``pip download`` (pure
  Python, so one set serves any Python 3 and platform), pinned to the versions installed here;
- ``data/MNIST/raw/*.gz``: MNIST's four idx files, gzipped (about 11 MB; ``run.py`` unpacks them);
- ``data/cifar10/{train,test}/<class>/*.jpg``: the first N training and M test images of every
  class of the image-folder copy of CIFAR-10 (about 0.9 KB each);
- ``MANIFEST.json``: what it holds, where from, and how big.

The folder then goes into one archive beside it, ``gpu_carry.tar.gz``, which is what travels: the
device refused the folder of 42,000 small files as larger than 64 MiB although their bytes add up to
less (it counts more than the bytes of each file). The working tree travels with the archive, and the
two together must stay under the device's 64 MiB: the script prints both sizes and refuses (deletes
both, exits 1) when they add up to more than ``--limit-mib`` (60 MiB).

    python tools/gpu_check/prepare.py                        # gpu_carry/, data from $PYROVAE_DATA
    python tools/gpu_check/prepare.py --no-wheels --out /tmp/carry --cifar-train-per-class 20
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
WHEELS = ["pyro-ppl", "pyro-api", "opt-einsum"]  # what pyro-ppl needs beyond torch, numpy and tqdm
MIB = 2 ** 20
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_carry", help="the folder to make (default gpu_carry, in the current folder)")
    p.add_argument("--data-dir", default=None,
                   help="data root holding MNIST/raw and cifar10/ (default: $PYROVAE_DATA, else ../shared/data)")
    p.add_argument("--no-wheels", action="store_true", help="data only: fetch no wheels")
    p.add_argument("--python-version", default="3.12",
                   help="the GPU machine's Python, for pip download (default 3.12; the wheels are pure Python)")
    p.add_argument("--cifar-train-per-class", type=int, default=2000, help="CIFAR-10 training images per class")
    p.add_argument("--cifar-test-per-class", type=int, default=200, help="CIFAR-10 test images per class")
    p.add_argument("--limit-mib", type=float, default=60.0,
                   help="refuse when the folder and the working tree together exceed this (MiB)")
    args = p.parse_args(argv)

    data = Path(args.data_dir or os.environ.get("PYROVAE_DATA") or ROOT.parent / "shared" / "data").expanduser()
    out = Path(args.out)
    start_folder(out)
    manifest = {"command": " ".join(["python", "tools/gpu_check/prepare.py", *sys.argv[1:]]),
                "git_commit": git_commit(), "data_source": str(data), "contents": {}}
    try:
        if not args.no_wheels:
            manifest["contents"]["wheels"] = fetch_wheels(out / "wheels", args.python_version)
        manifest["contents"]["mnist"] = copy_mnist(data / "MNIST" / "raw", out / "data" / "MNIST" / "raw")
        cifar = data / "cifar10"
        if cifar.is_dir():
            manifest["contents"]["cifar10"] = copy_cifar(cifar, out / "data" / "cifar10", args.cifar_train_per_class,
                                                         args.cifar_test_per_class)
        else:
            print(f"note: no CIFAR-10 image folder at {cifar}; the CIFAR-10 step of run.py will be skipped")
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
        shutil.rmtree(out, ignore_errors=True)
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 1

    tree = working_tree_size(besides=out)
    manifest["folder_mib"] = round(folder_size(out) / MIB, 2)
    manifest["working_tree_mib"] = round(tree / MIB, 2) if tree is not None else None
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    archive = out.with_name(out.name + ".tar.gz")
    with tarfile.open(archive, "w:gz") as tar:  # what travels: run.py reads the folder it unpacks to
        tar.add(out, arcname=out.name)
    carry = archive.stat().st_size
    for name, part in manifest["contents"].items():
        print(f"  {name:8s} {part['files']:6d} files  {part['bytes'] / MIB:6.2f} MiB")
    total = carry + (tree or 0)
    tree_text = f"{tree / MIB:.2f} MiB" if tree is not None else "unknown (not a git checkout)"
    print(f"{archive}: {carry / MIB:.2f} MiB; working tree {tree_text}; together {total / MIB:.2f} MiB "
          f"(limit {args.limit_mib:g} MiB)")
    if total > args.limit_mib * MIB:
        shutil.rmtree(out, ignore_errors=True)
        archive.unlink(missing_ok=True)
        print(f"prepare.py: error: {total / MIB:.1f} MiB would travel, more than {args.limit_mib:g} MiB (the device "
              f"takes 64 MiB in all). Deleted {out} and {archive}; carry fewer CIFAR-10 images (--cifar-train-per-class, "
              f"--cifar-test-per-class)", file=sys.stderr)
        return 1
    return 0


def start_folder(out: Path) -> None:
    """An empty ``out``. A folder already there is replaced only if this script made it (it holds
    MANIFEST.json) or it is empty, so that a mistyped --out never deletes anything else."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / "MANIFEST.json").is_file()):
            raise SystemExit(f"prepare.py: error: {out} exists and was not made by this script; "
                             "give another --out or remove it")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def fetch_wheels(folder: Path, python_version: str) -> dict:
    """``pip download`` of the wheels pyro-ppl needs, pinned to the versions installed here (if any)."""
    specs = []
    for name in WHEELS:
        try:
            specs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            specs.append(name)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--dest", str(folder), *specs]
    print("$", " ".join(command))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    files = sorted(folder.glob("*.whl"))
    if len(files) != len(WHEELS):
        raise ValueError(f"expected {len(WHEELS)} wheels in {folder}, found {[f.name for f in files]}")
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files), "specs": specs,
            "names": [f.name for f in files]}


def copy_mnist(raw: Path, dest: Path) -> dict:
    """The four idx files as ``.gz``: copied if the source has them gzipped, else compressed here
    (with no name or time in the gzip header, so the same data give the same bytes)."""
    dest.mkdir(parents=True)
    for name in MNIST_FILES:
        packed, plain = raw / f"{name}.gz", raw / name
        if packed.is_file():
            shutil.copyfile(packed, dest / packed.name)
        elif plain.is_file():
            with open(plain, "rb") as source, open(dest / f"{name}.gz", "wb") as target, \
                    gzip.GzipFile(filename="", mode="wb", fileobj=target, compresslevel=6, mtime=0) as zipped:
                shutil.copyfileobj(source, zipped, 1 << 20)
        else:
            raise FileNotFoundError(f"MNIST file {name} (or {name}.gz) not found in {raw}")
    return {"files": len(MNIST_FILES), "bytes": folder_size(dest), "format": "gzipped idx"}


def copy_cifar(source: Path, dest: Path, train_per_class: int, test_per_class: int) -> dict:
    """The first images (sorted by name) of every class folder, in the same ImageFolder layout."""
    counts = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        if per_class < 1:
            raise ValueError(f"--cifar-{split}-per-class must be at least 1, got {per_class}")
        classes = sorted(d for d in (source / split).iterdir() if d.is_dir())
        if not classes:
            raise FileNotFoundError(f"no class folders in {source / split}")
        counts[split] = 0
        for folder in classes:
            images = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[:per_class]
            (dest / split / folder.name).mkdir(parents=True)
            for f in images:
                shutil.copyfile(f, dest / split / folder.name / f.name)
            counts[split] += len(images)
    return {"files": counts["train"] + counts["test"], "bytes": folder_size(dest), "train_images": counts["train"],
            "test_images": counts["test"], "per_class": {"train": train_per_class, "test": test_per_class}}


def git_commit() -> str | None:
    """The commit of the working tree that travels with the folder (the GPU machine's copy has no
    .git), marked "+changes" when the tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                 capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+changes" if changed else head


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def working_tree_size(besides: Path) -> int | None:
    """Bytes of the files that travel with every device call: tracked, and untracked but not ignored
    (those inside the folder ``besides`` not counted: it is counted on its own)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    besides = besides.resolve()
    paths = {ROOT / name for name in listed.decode(errors="replace").split("\0") if name}
    return sum(p.stat().st_size for p in paths if p.is_file() and besides not in p.resolve().parents)


if __name__ == "__main__":
    sys.exit(main())
