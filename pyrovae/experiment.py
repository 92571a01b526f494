"""What every script in ``experiments/`` shares: its two output flags and the ``--smoke`` policy.

Two folders, one flag each:

``--out DIR``
    the results folder the script writes (figures, JSON); default ``results/<name>``.
``--runs DIR``
    the folder that holds its training runs, one subfolder per run with its checkpoint; default
    under ``runs/``. Only scripts that train have it.

``--smoke`` runs a script end to end on a tiny budget, for the tests. A smoke run never writes into
``results/`` or ``runs/``: every folder not given explicitly on the command line becomes a fresh
temporary folder, deleted when the script ends, so a smoke run leaves nothing behind. A folder given
explicitly is used as given (that is how the tests look at what a smoke run wrote).

    parser = argparse.ArgumentParser()
    add_output_flags(parser, out="results/mnist", runs="runs", smoke="1 epoch on 512 images")
    args = parser.parse_args()
    with output_folders(args.smoke, args.out, args.runs, default_out="results/mnist",
                        default_runs="runs") as folders:
        ...  # write into folders.out, train into folders.runs
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple

__all__ = ["Folders", "add_output_flags", "output_folders", "command"]


class Folders(NamedTuple):
    """Where a script writes: its results folder, and the folder of its training runs (None if it trains none)."""

    out: Path
    runs: Path | None


def add_output_flags(parser: argparse.ArgumentParser, *, out: str, runs: str | None = None,
                     smoke: str = "a tiny budget, for the tests") -> None:
    """Add ``--out`` (default ``out``), ``--runs`` when the script trains (default ``runs``) and ``--smoke``.

    The flags default to None, so that :func:`output_folders` can tell a folder given on the command
    line from a default one.
    """
    temporary = "under --smoke a temporary folder, deleted at the end"
    parser.add_argument("--out", metavar="DIR", default=None, help=f"results folder (default {out}; {temporary})")
    if runs is not None:
        parser.add_argument("--runs", metavar="DIR", default=None,
                            help=f"folder of the training runs and their checkpoints (default {runs}; {temporary})")
    parser.add_argument("--smoke", action="store_true",
                        help=f"{smoke}; writes into results/ and runs/ only where --out/--runs say")


@contextlib.contextmanager
def output_folders(smoke: bool, out: str | None, runs: str | None = None, *, default_out: str,
                   default_runs: str | None = None) -> Iterator[Folders]:
    """The folders a script writes into, as :class:`Folders`.

    A folder given explicitly (``out``/``runs`` not None) is used as it is. Otherwise: the default,
    or, under ``smoke``, the default's path inside one temporary folder (so a smoke run writes the
    same layout as a full one), which is deleted on leaving the block, also after an error. Folders
    are not created here: a script makes them when it has something to write.
    """
    temporary = Path(tempfile.mkdtemp(prefix="pyrovae-smoke-")) if smoke and (out is None or (
        runs is None and default_runs is not None)) else None

    def pick(given: str | None, default: str | None) -> Path | None:
        if given is not None:
            return Path(given)
        if default is None:
            return None
        return temporary / default if temporary is not None else Path(default)

    try:
        yield Folders(pick(out, default_out), pick(runs, default_runs))
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line that reruns ``script`` (a file in ``experiments/``) from the repository root,
    with ``argv`` (default: this process's arguments)."""
    path = Path(script).resolve()
    experiments = next((p for p in path.parents if p.name == "experiments"), None)
    shown = path.relative_to(experiments.parent) if experiments is not None else path
    return shlex.join(["python", str(shown), *(sys.argv[1:] if argv is None else argv)])
