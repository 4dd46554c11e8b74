"""SQLite persistence (WAL) of usage history, per-model statistics and learned footprints.

All methods are blocking and meant to run through `asyncio.to_thread`. The schema is versioned
with `PRAGMA user_version` and migrated forward on open. A file that cannot be opened or is not
a database makes `open()` return False with `error` set: the proxy keeps serving from memory.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable

import orjson

log = logging.getLogger("proxy.store")

MIGRATIONS: list[str] = [
    # 1: history per model and minute, statistics snapshots, learned footprints
    """
    CREATE TABLE usage_minutes (
        model TEXT NOT NULL, minute INTEGER NOT NULL,
        requests INTEGER NOT NULL, failures INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
        latency_sum_s REAL NOT NULL,
        PRIMARY KEY (model, minute));
    CREATE TABLE model_stats (model TEXT PRIMARY KEY, snapshot BLOB NOT NULL);
    CREATE TABLE footprints (
        model TEXT PRIMARY KEY, footprint_bytes REAL, samples INTEGER NOT NULL,
        load_time_s REAL, load_count INTEGER NOT NULL);
    """,
    # 2: footprints keyed by upstream identity (URL | model key | load options): the rows of
    # version 1 carry no identity and may have been learned from noise, so they go. Instances
    # the proxy loaded, so that its ownership survives a restart.
    """
    DELETE FROM footprints;
    CREATE TABLE owned_instances (
        upstream TEXT NOT NULL, instance_id TEXT NOT NULL, model TEXT NOT NULL,
        load_config BLOB NOT NULL, loaded_at REAL NOT NULL,
        PRIMARY KEY (upstream, instance_id));
    """,
    # 3: what the engine learned of each model's use (engine.learning)
    """
    CREATE TABLE patterns (model TEXT PRIMARY KEY, snapshot BLOB NOT NULL);
    """,
    # 4: a lower bound on a footprint: the memory LM Studio refused to load the model in
    """
    ALTER TABLE footprints ADD COLUMN footprint_floor_bytes REAL;
    """,
]


def default_path() -> Path:
    return Path.home() / ".local" / "state" / "lmstudio-proxy" / "history.sqlite3"


class UsageStore:
    def __init__(self, path: str | Path, retention_days: float = 30.0) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.error: str | None = None
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()   # one writer at a time across to_thread workers

    @property
    def ok(self) -> bool:
        return self._db is not None and self.error is None

    def open(self) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._migrate(db)
        except (sqlite3.Error, OSError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("history database %s is unusable (%s); statistics are kept in memory "
                      "only and will not survive a restart", self.path, self.error)
            return False
        self._db = db
        return True

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this proxy "
                                        f"({len(MIGRATIONS)})")
        for number in range(version, len(MIGRATIONS)):
            db.executescript("BEGIN;" + MIGRATIONS[number] +
                             f";PRAGMA user_version={number + 1};COMMIT;")

    def close(self) -> None:
        if self._db is not None:
            with self._lock:
                self._db.close()
            self._db = None

    def load(self, upstream: str = "", since_minute: int | None = None) -> dict[str, Any]:
        """{"stats": {model: snapshot}, "footprints": {identity: {...}},
        "owned": {instance_id: {"model", "load_config", "loaded_at"}}, "patterns": {model: ...},
        "minutes": {model: [(minute, requests, failures)]}} (owned: of `upstream`; minutes:
        of the models in stats, from since_minute on, none without it)."""
        if self._db is None:
            return {"stats": {}, "footprints": {}, "owned": {}, "patterns": {}, "minutes": {}}
        with self._lock:
            stats = {m: orjson.loads(s) for m, s in
                     self._db.execute("SELECT model, snapshot FROM model_stats")}
            minutes = {} if since_minute is None else {
                m: list(self._db.execute(   # by model: the primary key's index, no scan
                    "SELECT minute, requests, failures FROM usage_minutes "
                    "WHERE model = ? AND minute >= ? ORDER BY minute", (m, since_minute)))
                for m in stats}
            footprints = {r[0]: {"footprint_bytes": r[1], "samples": r[2], "load_time_s": r[3],
                                 "load_count": r[4], "footprint_floor_bytes": r[5]}
                          for r in self._db.execute(
                              "SELECT model, footprint_bytes, samples, load_time_s, "
                              "load_count, footprint_floor_bytes FROM footprints")}
            owned = {r[0]: {"model": r[1], "load_config": orjson.loads(r[2]), "loaded_at": r[3]}
                     for r in self._db.execute(
                         "SELECT instance_id, model, load_config, loaded_at FROM owned_instances "
                         "WHERE upstream = ?", (upstream,))}
            patterns = {m: orjson.loads(p) for m, p in
                        self._db.execute("SELECT model, snapshot FROM patterns")}
        return {"stats": stats, "footprints": footprints, "owned": owned, "patterns": patterns,
                "minutes": minutes}

    def write(self, minutes: dict[tuple[str, int], list[float]],
              stats: dict[str, dict[str, Any]], footprints: dict[str, dict[str, Any]],
              now_minute: int, *, upstream: str = "",
              owned_add: dict[str, dict[str, Any]] | None = None,
              owned_remove: set[str] | None = None,
              patterns: dict[str, dict[str, Any]] | None = None) -> bool:
        def work(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO usage_minutes VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(model, minute) DO UPDATE SET "
                "requests = requests + excluded.requests, "
                "failures = failures + excluded.failures, "
                "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens, "
                "latency_sum_s = latency_sum_s + excluded.latency_sum_s",
                [(m, minute, *v) for (m, minute), v in minutes.items()])
            db.executemany("INSERT OR REPLACE INTO model_stats VALUES (?, ?)",
                           [(m, orjson.dumps(s)) for m, s in stats.items()])
            db.executemany("INSERT OR REPLACE INTO footprints VALUES (?, ?, ?, ?, ?, ?)",
                           [(m, f["footprint_bytes"], f["samples"], f["load_time_s"],
                             f["load_count"], f.get("footprint_floor_bytes"))
                            for m, f in footprints.items()])
            db.executemany("INSERT OR REPLACE INTO patterns VALUES (?, ?)",
                           [(m, orjson.dumps(p)) for m, p in (patterns or {}).items()])
            self._write_owned(db, upstream, owned_add, owned_remove)
            db.execute("DELETE FROM usage_minutes WHERE minute < ?",
                       (now_minute - int(self.retention_days * 1440),))
        return self._transaction(work)

    def write_owned(self, upstream: str, owned_add: dict[str, dict[str, Any]],
                    owned_remove: set[str]) -> bool:
        """Ownership changes alone, committed at once: they must survive a crash that comes
        before the next batched write."""
        return self._transaction(
            lambda db: self._write_owned(db, upstream, owned_add, owned_remove))

    @staticmethod
    def _write_owned(db: sqlite3.Connection, upstream: str,
                     owned_add: dict[str, dict[str, Any]] | None,
                     owned_remove: set[str] | None) -> None:
        db.executemany("DELETE FROM owned_instances WHERE upstream = ? AND "
                       "instance_id = ?", [(upstream, i) for i in owned_remove or ()])
        db.executemany("INSERT OR REPLACE INTO owned_instances VALUES (?, ?, ?, ?, ?)",
                       [(upstream, i, o["model"], orjson.dumps(o["load_config"]),
                         o["loaded_at"]) for i, o in (owned_add or {}).items()])

    def _transaction(self, work: Callable[[sqlite3.Connection], None]) -> bool:
        if self._db is None:
            return False
        try:
            with self._lock:
                db = self._db
                db.execute("BEGIN")
                work(db)
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db is not None and self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if self.error is None:
                log.error("writing history to %s failed (%s); keeping statistics in memory",
                          self.path, exc)
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        self.error = None
        return True

    def history(self, model: str, since_minute: int) -> list[tuple]:
        if self._db is None:
            return []
        with self._lock:
            return list(self._db.execute(
                "SELECT minute, requests, failures, prompt_tokens, completion_tokens, "
                "latency_sum_s FROM usage_minutes WHERE model = ? AND minute >= ? "
                "ORDER BY minute", (model, since_minute)))
