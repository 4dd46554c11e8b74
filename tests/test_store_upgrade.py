"""Upgrading onto an existing history file (`python -m proxy`, as an operator would): an older
file is migrated step by step with each step in the log and its statistics kept; a file whose
version says more than its tables hold is repaired instead of leaving every statistic in
memory; a newer release's file is left as it is with what to do; and a file this release
wrote is one the releases that would thin its rows refuse."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson

from proxy.engine.usage import BOUNDS_S
from proxy.store import MIGRATIONS, UsageStore

from .test_store_damage import (GEMMA, chat, config_for, persistence, requests_in, seed,  # noqa: F401
                                started, stop)
from .test_signals import MODEL

LATEST = len(MIGRATIONS)


def version_of(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def write_version_1(path: Path) -> None:
    """A history as the first release (schema version 1) left it: totals and histograms
    per model, and a footprints row keyed by the bare model key."""
    latency = [0] * (len(BOUNDS_S) + 1)
    latency[60] = 15
    snapshot = {"requests": 15, "failures": 2, "prompt_tokens": 15, "completion_tokens": 120,
                "estimated_tokens": 0, "generation_s": 0.7,
                "latency": {"counts": latency, "count": 15, "total": 1.3},
                "ttft": {"counts": [0] * (len(BOUNDS_S) + 1), "count": 0, "total": 0.0}}
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(f"BEGIN;{MIGRATIONS[0].script};PRAGMA user_version=1;COMMIT;")
    db.execute("INSERT INTO model_stats VALUES (?, ?)", (MODEL, orjson.dumps(snapshot)))
    db.execute("INSERT INTO footprints VALUES (?, NULL, 0, 0.1, 4)", (MODEL,))
    db.close()


async def test_a_version_1_history_is_migrated_step_by_step_in_the_log_and_kept(
        emulator, tmp_path, http, started):
    path = tmp_path / "history.sqlite3"
    write_version_1(path)
    proxy = await started(config_for(tmp_path, emulator.url, path))
    log = "\n".join(proxy.lines)
    assert f"is at schema version 1, this proxy's is {LATEST}: migrating it " \
           f"({LATEST - 1} steps)" in log
    for number in range(1, LATEST):
        assert f"schema version {number} → {number + 1}: {MIGRATIONS[number].what}" in log
    assert "learned footprints of version 1 are dropped" in log   # said, not silently lost
    assert (await persistence(http, proxy.url))["ok"] is True
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        row = (await r.json())["models"][MODEL]
    assert (row["requests"], row["failures"], row["p95_latency_ms"] is not None) == \
        (15, 2, True)
    # Its load times and count: before, the migration deleted them with the footprints.
    assert (row["loads"], row["avg_load_time_s"]) == (4, 0.1)
    await chat(http, proxy.url)
    await stop(proxy)
    assert requests_in(path)[MODEL] == 16 and version_of(path) == LATEST
    store = UsageStore(path)               # under the server's identity now, the chat's load on
    assert store.open()                    # top of the 4 kept
    (kept,) = store.load(emulator.url)["footprints"].values()
    store.close()
    assert kept["load_count"] == 5


async def test_a_history_lacking_what_its_version_promises_is_repaired_and_kept(
        emulator, tmp_path, http, started):
    """A table and a column gone (a migration undone by hand): before, every statistic stayed
    in memory for good ('no such table: patterns')."""
    path = tmp_path / "history.sqlite3"
    await seed(path, emulator.url, http)
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("DROP TABLE patterns; ALTER TABLE footprints DROP COLUMN "
                     "footprint_floor_bytes;")
    db.close()
    proxy = await started(config_for(tmp_path, emulator.url, path))
    report = await persistence(http, proxy.url)
    assert (report["ok"], report["error"]) == (True, None)
    (line,) = [ln for ln in proxy.lines if "lacked" in ln]
    assert "table patterns, column footprints.footprint_floor_bytes" in line
    assert "the rest of its history is kept" in line
    await chat(http, proxy.url)
    await stop(proxy)
    assert requests_in(path) == {MODEL: 2, GEMMA: 1, "text-embedding-nomic-embed-text-v1.5": 1}


def test_a_step_found_done_already_is_taken_as_done(tmp_path):
    """Version 3 by its mark, with version 4's column already there: before, 'duplicate column
    name' left the statistics in memory."""
    path = tmp_path / "history.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    for number in range(4):
        step = MIGRATIONS[number]
        extra = ";ALTER TABLE {} ADD COLUMN {} {}".format(*step.add_column) \
            if step.add_column else ""
        db.executescript(f"BEGIN;{step.script}{extra};COMMIT;")
    db.execute("PRAGMA user_version=3")
    db.execute("INSERT INTO footprints VALUES ('u|m|{}', 5e9, 2, 1.5, 2, 4e9)")
    db.close()
    store = UsageStore(path)
    assert store.open() and store.error is None
    assert store.load("u")["footprints"]["u|m|{}"]["footprint_floor_bytes"] == 4e9
    store.close()
    assert version_of(path) == LATEST


async def test_a_newer_releases_history_is_left_as_it_is_with_what_to_do(
        emulator, tmp_path, http, started):
    path = tmp_path / "history.sqlite3"
    await seed(path, emulator.url, http)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA user_version={LATEST + 1}")
    db.close()
    before = path.read_bytes()
    proxy = await started(config_for(tmp_path, emulator.url, path))
    report = await persistence(http, proxy.url)
    assert report["ok"] is False
    assert f"schema version {LATEST + 1} is newer than this proxy's ({LATEST})" in \
        report["error"]
    assert "Run the newer release, or give this one another storage.path" in report["error"]
    await chat(http, proxy.url)
    await stop(proxy)
    assert path.read_bytes() == before and report["damage"] == []


async def test_a_history_this_release_wrote_is_refused_by_releases_that_would_thin_it(
        emulator, tmp_path, http):
    """Releases of schema version 4 read statistics rows without the last use and evictions
    and write them back so: they refuse any version above 4, so this release's must be."""
    path = tmp_path / "history.sqlite3"
    await seed(path, emulator.url, http)
    store = UsageStore(path)
    assert store.open()
    assert "last_used_wall_s" in store.load()["stats"][MODEL]
    store.close()
    assert version_of(path) > 4
