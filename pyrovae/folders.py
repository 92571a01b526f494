"""Output folders: one writer at a time, claimed before any work, and nothing left by a failed start.

A command that writes into a folder (``train``, ``train --resume``, ``evaluate``, ``sample``) holds
the folder's lock file, ``.pyrovae.lock``, from before it reads any data until it ends: a file
created with ``O_EXCL`` that says who holds it (pid, host, start time, command). A second writer is
refused, naming the first; a lock left by a process that no longer runs on this host is taken over
with a note. Making the lock file is also the check that the folder can be written at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from pyrovae.atomic import StorageError, make_folder, storage_error

__all__ = ["LOCK_NAME", "FolderInUseError", "acquire", "release", "claimed", "fresh_folder", "remove_if_empty",
           "check_writable"]

LOCK_NAME = ".pyrovae.lock"


class FolderInUseError(RuntimeError):
    """Another pyrovae command is writing into the folder."""


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _holder() -> dict:
    """What this process writes into a lock it takes."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": f"{datetime.now():%Y-%m-%d %H:%M:%S}",
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), "boot": _boot_id()}


def _read(path: Path, patience: float = 1.0) -> dict | None:
    """The holder a lock file names; None if it stays unreadable for ``patience`` seconds (a writer
    between creating it and filling it in is given that long)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            holder = json.loads(path.read_text())
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                return holder
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _alive(holder: dict) -> bool:
    """Whether the process a lock names may still run (always yes for another host: it cannot be asked)."""
    if holder.get("host") != socket.gethostname():
        return True
    if holder.get("boot") and _boot_id() and holder["boot"] != _boot_id():
        return False  # taken before this machine last started
    if holder["pid"] == os.getpid():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it runs, as another user
    return True


def _in_use(folder: Path, holder: dict | None) -> FolderInUseError:
    lock = folder / LOCK_NAME
    if holder is None:
        return FolderInUseError(f"{folder} holds a lock file that cannot be read ({lock}): another pyrovae command "
                                f"may be writing into it. If none is, remove {lock} and run the command again")
    return FolderInUseError(
        f"{folder} is in use by another pyrovae command: pid {holder['pid']} on {holder.get('host')}, started "
        f"{holder.get('started')} ({holder.get('command')}); wait for it to end or choose another folder "
        f"(if that process no longer runs, remove {lock})")


def _create(lock: Path, advice: str | None) -> bool:
    """Make the lock file, filled in; False if one is there already."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    except OSError as e:
        error = storage_error(lock.parent, e)
        if advice is not None and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            error = StorageError(e.errno, f"cannot write {lock.parent}: {e.strerror or e}; {advice}")
        raise error from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_holder()) + "\n")
    except OSError as e:  # made but not filled in (a full disk): no lock is left behind
        lock.unlink(missing_ok=True)
        raise storage_error(lock.parent, e) from None
    return True


def _take_over(lock: Path, stale: dict) -> None:
    """Move a stale lock aside; put it back if, in the meantime, another process had replaced it."""
    aside = lock.with_name(f"{LOCK_NAME}.{os.getpid()}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # another process took it over first
    moved = _read(aside, patience=0.0)
    if moved is not None and (moved["pid"], moved.get("started")) != (stale["pid"], stale.get("started")):
        with contextlib.suppress(OSError):
            os.link(aside, lock)  # a live lock, taken over in between: restored (unless yet another is there)
    aside.unlink(missing_ok=True)


def acquire(folder, log=_note, advice: str | None = None) -> Path:
    """Take the lock of ``folder`` (which must exist); returns the lock file. Raises
    :class:`FolderInUseError` while another process holds it, and a
    :class:`pyrovae.atomic.StorageError` if the folder cannot be written (``advice``: what to do then,
    when the usual advice, another folder, does not fit)."""
    folder = Path(folder)
    lock = folder / LOCK_NAME
    for _ in range(10):
        if _create(lock, advice):
            return lock
        try:
            holder = _read(lock)
        except FileNotFoundError:
            continue  # released in between: try again
        if holder is None or _alive(holder):
            raise _in_use(folder, holder)
        log(f"note: {folder} was locked by pid {holder['pid']} (started {holder.get('started')}), which no longer "
            "runs; taking the lock over")
        _take_over(lock, holder)
    with contextlib.suppress(FileNotFoundError):
        raise _in_use(folder, _read(lock, patience=0.0))
    raise _in_use(folder, None)


def release(lock: Path | None) -> None:
    """Remove a lock this process took (a lock another process holds now is left alone)."""
    if lock is None:
        return
    try:
        holder = json.loads(Path(lock).read_text())
    except (OSError, ValueError):
        return
    if isinstance(holder, dict) and holder.get("pid") == os.getpid():
        Path(lock).unlink(missing_ok=True)


def remove_if_empty(folder) -> bool:
    """Remove ``folder`` if nothing is in it; whether it was removed."""
    try:
        Path(folder).rmdir()
    except OSError:
        return False
    return True


def _enter(folder: Path, create: bool, log, advice: str | None) -> tuple[bool, Path]:
    created = create and not folder.exists()
    if create:
        make_folder(folder)
    try:
        return created, acquire(folder, log, advice)
    except BaseException:
        if created:
            remove_if_empty(folder)
        raise


@contextlib.contextmanager
def claimed(folder, *, create: bool = False, world=None, log=_note, advice: str | None = None):
    """Hold the lock of ``folder`` while the block runs; yields whether the folder was made here
    (``create``: made when missing). A folder made here and empty at the end is removed. Under
    torchrun (``world``, a :class:`pyrovae.distributed.World`) rank 0 alone takes and drops the lock."""
    folder = Path(folder)
    main = world is None or world.main
    enter = lambda: _enter(folder, create, log, advice)  # noqa: E731
    created, lock = world.from_main(enter) if world is not None else enter()
    try:
        yield created
    finally:
        if main:
            release(lock)
            if created:
                remove_if_empty(folder)


def fresh_folder(base) -> Path:
    """A new, empty folder named ``base``, or ``base-2``, ``base-3``, ... when that is taken: claimed by an
    exclusive mkdir, so two processes never get the same one."""
    base = Path(base)
    make_folder(base.parent)
    for k in range(1, 10_000):
        path = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise storage_error(path, e) from None
        return path
    raise storage_error(base, OSError(errno.EEXIST, "every name up to -9999 is taken"))


def check_writable(path) -> None:
    """Raise a :class:`pyrovae.atomic.StorageError` now if the file ``path`` could not be written: its
    folder missing or read-only, a part of the path a file, or ``path`` itself a folder."""
    path = Path(path)
    if path.is_dir():
        raise storage_error(path, OSError(errno.EISDIR, "it is a folder"))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise storage_error(path, e) from None
