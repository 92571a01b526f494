"""Progress bars for work that takes more than a few seconds: shown on a terminal, silent elsewhere."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

__all__ = ["progress"]


def progress(iterable=None, *, quiet: bool = False, **options) -> tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand), off when ``quiet`` or stderr is not a terminal."""
    return tqdm(iterable, disable=quiet or not sys.stderr.isatty(), leave=False, dynamic_ncols=True, **options)
