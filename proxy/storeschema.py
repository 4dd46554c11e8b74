"""The history file's schema: versioned with `PRAGMA user_version` and migrated forward on open,
each step said in the log. A file whose version says more than its tables hold (a step undone or
redone by hand, a half-restored copy) gets the missing tables and columns, empty, instead of
leaving every statistic in memory; a file of a newer release is left as it is.

A step is also due when a row's contents grow in a way an older release would drop on writing
the row back (version 5): the older release then refuses the file instead of thinning it."""
from __future__ import annotations

import logging
import sqlite3
from typing import NamedTuple

from .storedamage import is_damage

log = logging.getLogger("proxy.store")


class Migration(NamedTuple):
    what: str                                      # said in the log when the step runs
    script: str = ""
    add_column: tuple[str, str, str] | None = None   # (table, column, type), if not there yet


_USAGE_MINUTES = """CREATE TABLE IF NOT EXISTS usage_minutes (
    model TEXT NOT NULL, minute INTEGER NOT NULL,
    requests INTEGER NOT NULL, failures INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    latency_sum_s REAL NOT NULL,
    PRIMARY KEY (model, minute))"""
_MODEL_STATS = ("CREATE TABLE IF NOT EXISTS model_stats "
                "(model TEXT PRIMARY KEY, snapshot BLOB NOT NULL)")
_FOOTPRINTS = """CREATE TABLE IF NOT EXISTS footprints (
    model TEXT PRIMARY KEY, footprint_bytes REAL, samples INTEGER NOT NULL,
    load_time_s REAL, load_count INTEGER NOT NULL)"""
_OWNED = """CREATE TABLE IF NOT EXISTS owned_instances (
    upstream TEXT NOT NULL, instance_id TEXT NOT NULL, model TEXT NOT NULL,
    load_config BLOB NOT NULL, loaded_at REAL NOT NULL,
    PRIMARY KEY (upstream, instance_id))"""
_PATTERNS = ("CREATE TABLE IF NOT EXISTS patterns "
             "(model TEXT PRIMARY KEY, snapshot BLOB NOT NULL)")

MIGRATIONS: list[Migration] = [
    Migration("history per model and minute, statistics snapshots, learned footprints",
              f"{_USAGE_MINUTES};{_MODEL_STATS};{_FOOTPRINTS}"),
    # The footprints of version 1 carry no server identity and may have been learned from
    # noise; their load times and counts are measured, and kept aside by model (store.py).
    Migration("footprints keyed by server, model and load options (the learned footprints of "
              "version 1 are dropped, as they name no server; their load times and counts are "
              "kept, each given to its model when seen); the instances the proxy loaded",
              "CREATE TABLE IF NOT EXISTS load_times_v1 AS SELECT model, load_time_s, "
              f"load_count FROM footprints WHERE load_count > 0;DELETE FROM footprints;{_OWNED}"),
    Migration("what the engine learned of each model's use", _PATTERNS),
    Migration("a lower bound on a footprint: the memory the server refused to load it in",
              add_column=("footprints", "footprint_floor_bytes", "REAL")),
    # Nothing changes in the tables: statistics snapshots now hold a model's last use and
    # evictions, and patterns more of what was learned, which a release that knows version 4
    # would drop when it rewrites a row. Such a release refuses version 5 and leaves it alone.
    Migration("statistics that releases of version 4 would drop on rewriting them (last use, "
              "evictions): those releases now leave the file alone"),
]

LATEST = len(MIGRATIONS)

# The latest layout, for the repair: each table's creation, and the columns added to it later.
_TABLES = {"usage_minutes": _USAGE_MINUTES, "model_stats": _MODEL_STATS,
           "footprints": _FOOTPRINTS, "owned_instances": _OWNED, "patterns": _PATTERNS}
_ADDED_COLUMNS = [m.add_column for m in MIGRATIONS if m.add_column]


class NewerSchema(sqlite3.DatabaseError):
    """Written by a newer release: left as it is (not damage, never moved aside)."""


def migrate(db: sqlite3.Connection, path: object) -> None:
    """Bring db to LATEST, one transaction per step; then repair what its version lacks.
    Raises NewerSchema, or sqlite3.Error naming the step that failed (the file stays at the
    version before it)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > LATEST:
        raise NewerSchema(
            f"schema version {version} is newer than this proxy's ({LATEST}): the file was "
            "written by a newer release, whose statistics this one would drop on writing, so "
            "it is left as it is. Run the newer release, or give this one another "
            "storage.path (or move the file aside) to start a fresh history")
    new = version == 0 and _empty(db)
    if version < LATEST and not new:
        log.info("history database %s is at schema version %d, this proxy's is %d: migrating "
                 "it (%d step%s)", path, version, LATEST, LATEST - version,
                 "s" if LATEST - version > 1 else "")
    for number in range(version, LATEST):
        step = MIGRATIONS[number]
        script = step.script
        if step.add_column and not _has_column(db, *step.add_column[:2]):
            table, column, kind = step.add_column
            script += f";ALTER TABLE {table} ADD COLUMN {column} {kind}"
        try:
            db.executescript(f"BEGIN;{script};PRAGMA user_version={number + 1};COMMIT;")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if is_damage(exc):   # the store moves a damaged file aside by its code
                raise
            raise type(exc)(f"migrating from schema version {number} to {number + 1} "
                            f"({step.what}) failed: {exc}; the file is left at version "
                            f"{number}") from exc
        if not new:   # a new file's steps are not news
            log.info("history database %s: schema version %d → %d: %s", path, number,
                     number + 1, step.what)
    if new:
        log.info("history database %s: a new file (schema version %d)", path, LATEST)
    _repair(db, path)


def _repair(db: sqlite3.Connection, path: object) -> None:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = [t for t in _TABLES if t not in tables]
    columns = [c for c in _ADDED_COLUMNS if c[0] not in missing and
               not _has_column(db, c[0], c[1])]
    if not missing and not columns:
        return
    # A table created here has its first layout; the columns added since go on it too.
    added = [c for c in _ADDED_COLUMNS if c[0] in missing]
    db.executescript("BEGIN;" + "".join(f"{_TABLES[t]};" for t in missing) +
                     "".join(f"ALTER TABLE {t} ADD COLUMN {c} {k};"
                             for t, c, k in columns + added) + "COMMIT;")
    lacked = [f"table {t}" for t in missing] + [f"column {t}.{c}" for t, c, _ in columns]
    log.warning("history database %s is at schema version %d but lacked %s (a migration undone "
                "or done in part by hand?): added empty; the rest of its history is kept",
                path, LATEST, ", ".join(lacked))


def _has_column(db: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[1] == column for r in db.execute(f"PRAGMA table_info({table})"))


def _empty(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
