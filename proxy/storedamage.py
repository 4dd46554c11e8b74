"""A damaged history file: how SQLite says so, and where the file goes (kept, never deleted)."""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

# SQLite's primary result codes for a damaged file: a malformed page, a header not SQLite's.
_DAMAGE_CODES = (11, 26)   # SQLITE_CORRUPT, SQLITE_NOTADB


def is_damage(exc: BaseException) -> bool:
    """Not a locked, read-only or full disk, a permission or a newer schema: those leave the
    file as it is."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and \
        code & 0xFF in _DAMAGE_CODES


def move_aside(path: Path, inode: int | None) -> Path | None:
    """`<file>.corrupt-<UTC time>`, its WAL and shared memory beside it under the names SQLite
    looks for, so that the copy opens as it was; a stale WAL left in place would be replayed
    into the fresh file. None: nothing moved, the file at path is no longer the one with that
    inode (another engine of this process moved it already) or is gone."""
    try:
        if inode is not None and os.stat(path).st_ino != inode:
            return None
    except FileNotFoundError:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    for suffix in ("-wal", "-shm", ""):   # the database last: it alone marks the move
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, f"{target}{suffix}")
    return target
