"""One process per history file: an OS advisory lock (flock) on `<file>.lock`.

Two proxies on one file do not merge: each rewrites the per-model snapshots it holds, so the
last writer wins and the other's requests vanish at the next restart. The second process is
refused instead. The lock is the OS's, so a process that exits or is killed (-9) releases it;
a stale lock file left behind means nothing. Engines of one process (the library, a test)
may share a file: the claim is counted per process.

The lock is on a sibling file, not on the database: SQLite takes POSIX locks on the database,
and where flock is emulated with POSIX locks (NFS) the two would collide.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import threading
from pathlib import Path

log = logging.getLogger("proxy.store")

_held: dict[str, list[int]] = {}   # lock file's real path → [fd, engines of this process]
_guard = threading.Lock()


class StorageInUse(RuntimeError):
    """Another live process holds the history file."""


def lock_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".lock")


def claim(db_path: Path) -> str | None:
    """Hold db_path for this process; returns the claim to release(), None where the file
    system cannot lock (logged: a second process would go unnoticed there).
    Raises StorageInUse when another live process holds it."""
    path = lock_path(db_path)
    key = os.path.realpath(path)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            return key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.warning("cannot create the lock file %s (%s): a second proxy on %s would go "
                        "unnoticed", path, exc.strerror or exc, db_path)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StorageInUse(
                    f"the history database {db_path} is in use by another proxy process"
                    f"{f' ({holder})' if holder else ''}: two processes on one file overwrite "
                    "each other's statistics. Give each process its own storage.path (replicas: "
                    "one file per replica, e.g. a volume per pod), or stop the other process "
                    "first.") from None
            log.warning("cannot lock %s (%s): a second proxy on %s would go unnoticed",
                        path, exc.strerror or exc, db_path)
            return None
        try:   # who holds it, for the message of the one refused (only that: a full disk
            os.ftruncate(fd, 0)                     # must not stop the start)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:
            pass
        _held[key] = [fd, 1]
        return key


def release(key: str | None) -> None:
    if key is None:
        return
    with _guard:
        held = _held.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _held[key]
            os.close(held[0])   # the lock goes with the descriptor


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
