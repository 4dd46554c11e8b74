"""SQLite persistence (WAL) of usage history, per-model statistics and learned footprints.

All methods are blocking and meant to run through `asyncio.to_thread`. The schema is versioned
and migrated forward on open (storeschema). One process per file (storelock).

What goes wrong with the file never stops the proxy:
- a damaged file (not a database, or a page found malformed on opening, reading or writing)
  is moved aside, kept for forensics as `<file>.corrupt-<UTC time>` with its WAL, and a fresh
  one started, so that what is counted from then on persists (`damage` says when and where
  to; `generation` counts the fresh starts, for the engine to write all it holds again). A
  fresh file found damaged too means a failing disk: statistics stay in memory from then on;
- a damaged row (a snapshot that is not a JSON object, a number that is not one) is skipped
  and named in the log and in `skipped`; the rest is loaded;
- a file that cannot be opened or read otherwise (permissions, a newer schema) is left as
  it is: `error` says why, and statistics stay in memory.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import orjson

from . import storelock
from .storedamage import is_damage, move_aside
from .storelock import StorageInUse
from .storeschema import MIGRATIONS, migrate

__all__ = ["MIGRATIONS", "StorageInUse", "UsageStore", "default_path"]

log = logging.getLogger("proxy.store")

MAX_SKIPPED = 20           # rows kept in `skipped` for /proxy/stats (all are logged)

def default_path() -> Path:
    return Path.home() / ".local" / "state" / "lmstudio-proxy" / "history.sqlite3"


class UsageStore:
    def __init__(self, path: str | Path, retention_days: float = 30.0, *,
                 refuse_in_use: bool = True) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        # False: a file another process holds leaves the statistics in memory (said in the
        # log and `error`) instead of raising StorageInUse (storage.py, for the library).
        self.refuse_in_use = refuse_in_use
        self.error: str | None = None
        # damaged files moved aside: {"error", "found" (opening, reading, writing), "moved_to",
        # "at_wall_s"}; damaged rows skipped on loading: {"table", "model", "error"}
        self.damage: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.generation = 0                  # fresh files started in place of damaged ones
        self._db: sqlite3.Connection | None = None
        self._inode: int | None = None       # of the file _db has open
        self._claim: str | None = None
        self._lock = threading.Lock()   # one writer at a time across to_thread workers

    @property
    def ok(self) -> bool:
        return self._db is not None and self.error is None

    def open(self) -> bool:
        """False: statistics stay in memory (`error` says why). Raises StorageInUse when
        another live process has the file."""
        if self._claim is None:
            try:
                self._claim = storelock.claim(self.path)
            except storelock.StorageInUse as exc:
                if self.refuse_in_use:
                    raise
                self._give_up(exc)
                return False
        try:
            self._db = self._connect()
        except (sqlite3.Error, OSError) as exc:
            if is_damage(exc):
                return self._replace_damaged(exc, "opening", None)
            self._give_up(exc)
            return False
        return True

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            migrate(db, self.path)
            self._inode = os.stat(self.path).st_ino
        except BaseException:
            db.close()
            raise
        return db

    def _give_up(self, exc: BaseException) -> None:
        """Statistics stay in memory; the file is left as it is."""
        self.error = f"{type(exc).__name__}: {exc}"
        log.error("history database %s is unusable (%s); statistics are kept in memory "
                  "only and will not survive a restart", self.path, self.error)
        self._close_db()
        storelock.release(self._claim)
        self._claim = None

    def _close_db(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass   # a damaged file may refuse even this; the descriptor goes regardless
            self._db = None

    def _replace_damaged(self, exc: sqlite3.Error, found: str,
                         failed: sqlite3.Connection | None) -> bool:
        """Move the damaged file aside (kept, never deleted) and start a fresh one.
        failed: the connection that met the damage (None: none was open); if another
        worker has replaced it meanwhile, there is nothing left to do."""
        with self._lock:
            if failed is not self._db:
                return self._db is not None
            error = f"{type(exc).__name__}: {exc}"
            self._close_db()
            if self.generation:   # a file this process started is damaged too
                self.error = error
                log.error("history database %s is damaged again (%s, found on %s): the disk "
                          "is suspect; statistics are kept in memory only and will not survive "
                          "a restart", self.path, error, found)
                return False
            try:
                moved_to = move_aside(self.path, self._inode)
                self._db = self._connect()
            except (sqlite3.Error, OSError) as again:
                self.error = f"{type(again).__name__}: {again}"
                log.error("history database %s is damaged (%s, found on %s) and cannot be "
                          "replaced (%s); statistics are kept in memory only and will not "
                          "survive a restart", self.path, error, found, self.error)
                return False
            self.generation += 1
            self.error = None
            self.damage.append({"error": error, "found": found,
                                "moved_to": str(moved_to) if moved_to else None,
                                "at_wall_s": time.time()})
            log.error("history database %s is damaged (%s, found on %s): moved to %s and a "
                      "fresh one started; statistics from now on persist, the history before "
                      "is in the moved file", self.path, error, found, moved_to)
            return True

    def close(self) -> None:
        with self._lock:
            self._close_db()
        storelock.release(self._claim)
        self._claim = None

    def load(self, upstream: str = "", since_minute: int | None = None) -> dict[str, Any]:
        """{"stats": {model: snapshot}, "footprints": {identity: {...}},
        "owned": {instance_id: {"model", "load_config", "loaded_at"}}, "patterns": {model: ...},
        "minutes": {model: [(minute, requests, failures)]}, "load_times_v1": {model: {...}}}
        (owned: of `upstream`; minutes: of the models in stats, from since_minute on, none
        without it; load_times_v1: what a version 1 file had learned, by model key). Damaged rows are
        skipped; a damaged file is replaced by a fresh one, and nothing is loaded."""
        empty: dict[str, Any] = {"stats": {}, "footprints": {}, "owned": {}, "patterns": {},
                                 "minutes": {}, "load_times_v1": {}}
        with self._lock:
            db = self._db
            if db is None:
                return empty
            try:
                return self._read(db, upstream, since_minute)
            except sqlite3.Error as exc:
                failure = exc
        if is_damage(failure):
            self._replace_damaged(failure, "reading", db)
        else:   # what was not read would be overwritten: nothing is written
            with self._lock:
                self._give_up(failure)
        return empty

    def _read(self, db: sqlite3.Connection, upstream: str,
              since_minute: int | None) -> dict[str, Any]:
        stats = {m: snap for m, blob in db.execute("SELECT model, snapshot FROM model_stats")
                 if (snap := self._object("model_stats", m, blob)) is not None}
        minutes = {} if since_minute is None else {
            m: [r for r in db.execute(   # by model: the primary key's index, no scan
                "SELECT minute, requests, failures FROM usage_minutes "
                "WHERE model = ? AND minute >= ? ORDER BY minute", (m, since_minute))
                if self._numbers("usage_minutes", m, r)]
            for m in stats}
        footprints = {}
        for r in db.execute("SELECT model, footprint_bytes, samples, load_time_s, load_count, "
                            "footprint_floor_bytes FROM footprints"):
            if self._numbers("footprints", r[0], (r[2], r[4]), (r[1], r[3], r[5])):
                footprints[r[0]] = {"footprint_bytes": r[1], "samples": r[2],
                                    "load_time_s": r[3], "load_count": r[4],
                                    "footprint_floor_bytes": r[5]}
        owned = {}
        for r in db.execute("SELECT instance_id, model, load_config, loaded_at "
                            "FROM owned_instances WHERE upstream = ?", (upstream,)):
            load_config = self._object("owned_instances", f"{r[1]} ({r[0]})", r[2])
            if load_config is not None and \
                    self._numbers("owned_instances", f"{r[1]} ({r[0]})", (r[3],)):
                owned[r[0]] = {"model": r[1], "load_config": load_config, "loaded_at": r[3]}
        patterns = {m: snap for m, blob in db.execute("SELECT model, snapshot FROM patterns")
                    if (snap := self._object("patterns", m, blob)) is not None}
        load_times = {}   # kept by the migration from version 1 (storeschema), by model key
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'load_times_v1'").fetchone():
            for m, seconds, count in db.execute("SELECT model, load_time_s, load_count "
                                                "FROM load_times_v1"):
                if self._numbers("load_times_v1", m, (count,), (seconds,)):
                    load_times[m] = {"load_time_s": seconds, "load_count": count}
        return {"stats": stats, "footprints": footprints, "owned": owned, "patterns": patterns,
                "minutes": minutes, "load_times_v1": load_times}

    def _object(self, table: str, model: str, blob: Any) -> dict[str, Any] | None:
        try:
            value = orjson.loads(blob)
        except (orjson.JSONDecodeError, TypeError) as exc:
            self.note_skipped(table, model, f"not JSON: {exc}")
            return None
        if not isinstance(value, dict):
            self.note_skipped(table, model, f"a JSON {type(value).__name__}, not an object")
            return None
        return value

    def _numbers(self, table: str, model: str, required: tuple,
                 optional: tuple = ()) -> bool:
        if all(isinstance(v, (int, float)) for v in required) and \
                all(v is None or isinstance(v, (int, float)) for v in optional):
            return True
        self.note_skipped(table, model, f"not a number in {(*required, *optional)!r:.80}")
        return False

    def note_skipped(self, table: str, model: str, error: str) -> None:
        log.error("history database %s: the %s row of %s is damaged (%s); skipped, the rest "
                  "is loaded", self.path, table, model, error)
        if len(self.skipped) < MAX_SKIPPED:
            self.skipped.append({"table": table, "model": model, "error": error})

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
        with self._lock:
            db = self._db
            if db is None:
                return False
            try:
                db.execute("BEGIN")
                work(db)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                failure = exc
                try:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass   # a damaged file may refuse the rollback too; it is replaced below
            else:
                self.error = None
                return True
        if is_damage(failure):   # the caller keeps what it wrote, for the fresh file
            self._replace_damaged(failure, "writing", db)
            return False
        if self.error is None:
            log.error("writing history to %s failed (%s); keeping statistics in memory",
                      self.path, failure)
        self.error = f"{type(failure).__name__}: {failure}"
        return False

    def history(self, model: str, since_minute: int) -> list[tuple]:
        with self._lock:
            db = self._db
            if db is None:
                return []
            try:
                return list(db.execute(
                    "SELECT minute, requests, failures, prompt_tokens, completion_tokens, "
                    "latency_sum_s FROM usage_minutes WHERE model = ? AND minute >= ? "
                    "ORDER BY minute", (model, since_minute)))
            except sqlite3.Error as exc:
                failure = exc
        if is_damage(failure):
            self._replace_damaged(failure, "reading", db)
        else:
            log.warning("reading the history of %s from %s failed (%s)", model, self.path,
                        failure)
        return []
