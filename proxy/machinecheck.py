"""What a configuration needs of this machine, checked where it is read (--check, the start,
every reload: cli.py) rather than where it is first used, deep in the start, where a failure
named the wrong thing (a CA file missing was "cannot listen on ..."):

- problems: a CA file (`upstream.ca_file`, `upstreams[].ca_file`) that cannot be read or holds
  no certificate; `server.event_loop: uvloop` without uvloop installed.
- warnings: a history database (`storage.path`) the proxy cannot create or write. It runs
  without one then, with statistics kept in memory only (as when the disk fails later), so
  this is said, not refused."""
from __future__ import annotations

import importlib.util
import os
import ssl
import tempfile
from pathlib import Path

from .config import Config


def machine_problems(config: Config) -> list[str]:
    problems = []
    ca_files = {"upstream.ca_file": config.upstream.ca_file}
    for i, h in enumerate(config.upstreams):
        if h.ca_file != config.upstream.ca_file:    # else taken from upstream:, named there
            ca_files[f"upstreams[{i}].ca_file"] = h.ca_file
    for path, ca_file in ca_files.items():
        problem = ca_file_problem(ca_file) if ca_file else None
        if problem is not None:
            problems.append(f"{path}: {problem}")
    if config.server.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        problems.append("server.event_loop: uvloop is not installed (pip install "
                        "'lmstudio-memory-proxy[fast]'), or choose auto or asyncio")
    return problems


def ca_file_problem(ca_file: str) -> str | None:
    """Why the file is no CA bundle the upstream's TLS can use (None: it is): it is loaded as
    the transport will load it."""
    try:
        ssl.create_default_context(cafile=ca_file)
    except OSError as exc:     # ssl's errors are OSErrors: this one has no file name
        if isinstance(exc, ssl.SSLError):
            reason = (exc.reason or str(exc)).replace("_", " ").lower()
            return f"{ca_file} holds no certificate the proxy can use ({reason}): give a " \
                   "PEM file of CA certificates"
        return f"cannot read {ca_file} ({exc.strerror or exc})"
    return None


def machine_warnings(config: Config) -> list[str]:
    if not config.storage.enabled:
        return []
    from .store import default_path    # a backend's: its default lives with it
    given = config.storage.path
    path = Path(given) if given else default_path()
    problem = _unwritable(path)
    if problem is None:
        return []
    where = "storage.path" if given else f"storage.path (the default, {path})"
    return [f"{where}: {problem}: the proxy would keep its statistics (footprints, load "
            "times, usage) in memory only, and lose them at a restart"]


def _unwritable(path: Path) -> str | None:
    """Why the history database at `path` could not be created or written (None: it can).
    A fleet's hosts keep theirs beside it (fleet/hosts.py host_storage_path): one directory."""
    try:
        return _unwritable_because(path)
    except OSError as exc:     # e.g. a directory on the way that may not be searched
        return f"cannot reach {path} ({exc.strerror or exc})"


def _unwritable_because(path: Path) -> str | None:
    if path.is_dir():
        return f"{path} is a directory"
    if path.exists():
        return None if os.access(path, os.R_OK | os.W_OK) else f"cannot write {path}"
    parent = path.parent
    while not parent.exists():     # the store creates the missing directories
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    try:   # a file made and removed at once: access() says yes to root even on /proc
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        why = exc.strerror or str(exc)
        return f"cannot create a file in {parent} ({why})" if parent == path.parent else \
            f"cannot create {path.parent} ({parent}: {why})"
    return None
