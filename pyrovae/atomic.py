"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

A failed write (disk full, read-only file system, permission denied, a path under a file) raises a
:class:`StorageError` that names the file and says what to do; the old file is left as it was, and
the temporary file is removed. Files get the usual mode for new files (0666 less the umask).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

__all__ = ["StorageError", "atomic_write", "make_folder", "remove_temporaries", "storage_error", "write_json"]

_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or write the run to another disk (--out)",
    errno.EDQUOT: "the disk quota is used up: free some space or write the run elsewhere (--out)",
    errno.EROFS: "the file system is read-only: choose a writable folder (--out)",
    errno.EACCES: "permission denied: choose a folder you may write to (--out), or change its permissions",
    errno.EPERM: "permission denied: choose a folder you may write to (--out), or change its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "a file of that name is in the way: choose another path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
}


class StorageError(OSError):
    """A file could not be written or a folder not made; the message says which and what to do."""

    def __str__(self) -> str:
        return self.strerror


def storage_error(path, error: OSError) -> StorageError:
    """One line for a failed write of ``path``: the system's reason and the remedy."""
    reason = error.strerror or str(error)
    advice = _ADVICE.get(error.errno, "check the path and the disk, then run the command again")
    return StorageError(error.errno, f"cannot write {path}: {reason}; {advice}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_folder(path) -> Path:
    """``mkdir -p`` with a :class:`StorageError` instead of a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # the path (or a parent) is a file
        raise storage_error(path, OSError(errno.ENOTDIR, "a file of that name exists")) from e
    except OSError as e:
        raise storage_error(path, e) from e
    return path


def atomic_write(path: str | Path, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; a new file gets the usual mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise storage_error(path, e) from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp is not None:
        Path(tmp).unlink(missing_ok=True)


def remove_temporaries(folder) -> list[Path]:
    """Remove the temporary files a killed :func:`atomic_write` left in ``folder``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stray = [p for p in folder.glob(".*.tmp") if p.is_file()]
    for p in stray:
        p.unlink(missing_ok=True)
    return stray


def write_json(path, obj) -> None:
    """``obj`` as indented JSON in ``path``, written atomically."""
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())
