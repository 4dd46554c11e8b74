"""The `storage:` section made into the history store: one rule for the proxy (app.py), each
host of a fleet (fleet/__init__.py) and the library's manager (library/manager.py)."""
from __future__ import annotations

from .config import StorageConfig
from .store import UsageStore, default_path


def configured_store(storage: StorageConfig) -> UsageStore | None:
    """The store `storage` names (not opened yet: the engine opens it at start and closes it
    at cleanup), or None when `storage.enabled` is false."""
    if not storage.enabled:
        return None
    return UsageStore(storage.path or default_path(), storage.retention_days)
