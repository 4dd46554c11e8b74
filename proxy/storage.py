"""The `storage:` section made into the history store: one rule for the proxy (app.py), each
host of a fleet (fleet/__init__.py) and the library's manager (library/manager.py)."""
from __future__ import annotations

from .config import StorageConfig
from .store import UsageStore, default_path


LIBRARY_FILE = "library-history.sqlite3"


def configured_store(storage: StorageConfig, *, library: bool = False) -> UsageStore | None:
    """The store `storage` names (not opened yet: the engine opens it at start and closes it
    at cleanup), or None when `storage.enabled` is false.

    `library`: for a library's manager. With no `storage.path` it keeps its history beside
    the proxy's default, in a file of its own (a manager next to a running proxy must not take
    the proxy's file), and when another process holds that file (another worker of the same
    app) it keeps its statistics in memory, with the reason logged, rather than refuse to
    start. A path given is the user's choice: another process on it refuses the start."""
    if not storage.enabled:
        return None
    if storage.path:
        return UsageStore(storage.path, storage.retention_days)
    if library:
        return UsageStore(default_path().with_name(LIBRARY_FILE), storage.retention_days,
                          refuse_in_use=False)
    return UsageStore(default_path(), storage.retention_days)
