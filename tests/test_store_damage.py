"""A damaged history file never stops the proxy: started on one (`python -m proxy`, as an
operator would), it moves the file aside, keeps it, starts a fresh one and keeps what it
counts from then on; a damaged row is skipped, named, and the rest loaded."""
from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import orjson
import pytest
import yaml

from proxy.app import create_app
from proxy.server.serving import serve
from proxy.store import UsageStore

from .conftest import proxy_config
from .test_signals import MODEL, ProxyProcess, write_config

GEMMA, EMBED = "google/gemma-3-12b", "text-embedding-nomic-embed-text-v1.5"
PAGE = 4096


async def seed(path: Path, upstream: str, http) -> None:
    """A history as a proxy leaves it: requests to three models, then a clean shutdown."""
    app = create_app(proxy_config(upstream, **{"storage.enabled": True,
                                               "storage.path": str(path)}))
    served = await serve(app)
    for model in (MODEL, GEMMA):
        await chat(http, served.url, model)
    async with http.post(f"{served.url}/v1/embeddings",
                         json={"model": EMBED, "input": "a"}) as r:
        assert r.status == 200
    await served.close()


async def chat(http, url: str, model: str = MODEL) -> None:
    async with http.post(f"{url}/v1/chat/completions", json={
            "model": model, "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status == 200


def config_for(tmp_path: Path, upstream: str, path: Path, **storage) -> Path:
    config = write_config(tmp_path / "proxy.yaml", upstream, 0)
    raw = yaml.safe_load(config.read_text())
    raw["storage"] = {"enabled": True, "path": str(path), **storage}
    config.write_text(yaml.safe_dump(raw))
    return config


@pytest.fixture
async def started():
    procs: list[ProxyProcess] = []

    async def start(config: Path) -> ProxyProcess:
        p = await ProxyProcess.start(config)
        procs.append(p)
        await p.ready()
        return p
    yield start
    for p in procs:
        await p.stop()


async def persistence(http, url: str) -> dict:
    async with http.get(f"{url}/proxy/stats") as r:
        return (await r.json())["persistence"]


async def stop(proxy: ProxyProcess) -> None:
    """SIGTERM: the clean shutdown writes what is held."""
    proxy.proc.send_signal(signal.SIGTERM)
    assert await proxy.proc.wait() == 0
    await proxy.stop()
    assert not any("Traceback" in ln for ln in proxy.lines), "\n".join(proxy.lines)


def requests_in(path: Path) -> dict[str, int]:
    store = UsageStore(path)
    assert store.open()
    stats = store.load()["stats"]
    store.close()
    return {m: s["requests"] for m, s in stats.items()}


def damage(path: Path, kind: str) -> None:
    """What the trial did to a copy of a real history."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if kind == "page2":       # the first table's root page, read as the history loads
            f.seek(PAGE)
            f.write(b"\xde\xad" * (PAGE // 2))
        elif kind == "truncated":
            f.truncate(size // 2)
        elif kind == "random bytes":
            f.seek(0)
            f.write(os.urandom(size))
        elif kind == "header":
            f.seek(0)
            f.write(b"X" * 100)


@pytest.mark.parametrize("kind", ["page2", "truncated", "random bytes", "header"])
async def test_a_damaged_history_is_moved_aside_and_a_fresh_one_keeps_what_comes(
        kind, emulator, tmp_path, http, started):
    path = tmp_path / "history.sqlite3"
    await seed(path, emulator.url, http)
    damage(path, kind)
    damaged = path.read_bytes()
    proxy = await started(config_for(tmp_path, emulator.url, path))
    report = await persistence(http, proxy.url)
    assert report["ok"] is True and report["error"] is None
    (found,) = report["damage"]
    assert found["found"] == ("reading" if kind == "page2" else "opening")
    assert "malformed" in found["error"] or "not a database" in found["error"]
    moved = Path(found["moved_to"])
    assert moved.parent == tmp_path and moved.name.startswith("history.sqlite3.corrupt-")
    assert moved.read_bytes() == damaged                    # kept as it was, for forensics
    assert any(str(moved) in ln and "fresh one started" in ln for ln in proxy.lines)
    await chat(http, proxy.url)
    await stop(proxy)
    assert requests_in(path) == {MODEL: 1}                  # counted from the start on
    assert moved.read_bytes() == damaged


async def test_a_damaged_row_is_skipped_and_named_and_the_rest_is_loaded(
        emulator, tmp_path, http, started):
    path = tmp_path / "history.sqlite3"
    await seed(path, emulator.url, http)
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE model_stats SET snapshot = '{garbage' WHERE model = ?", (MODEL,))
        db.execute("UPDATE model_stats SET snapshot = '{\"latency\": 5}' WHERE model = ?",
                   (GEMMA,))                                # JSON, of the wrong shape
    db.close()
    proxy = await started(config_for(tmp_path, emulator.url, path))
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        stats = await r.json()
    assert stats["models"][EMBED]["requests"] == 1          # the rest was loaded
    assert stats["models"][MODEL]["requests"] == 0
    report = stats["persistence"]
    assert report["ok"] is True and report["damage"] == []
    assert [(s["table"], s["model"]) for s in report["skipped"]] == [
        ("model_stats", MODEL), ("model_stats", GEMMA)]
    for model in (MODEL, GEMMA):
        assert any(f"model_stats row of {model}" in ln and "skipped" in ln
                   for ln in proxy.lines)
    await chat(http, proxy.url)
    await stop(proxy)
    db = sqlite3.connect(path)
    kept = dict(db.execute("SELECT model, snapshot FROM model_stats"))
    db.close()
    assert kept[GEMMA] == '{"latency": 5}'                 # unused since: left as found
    del kept[GEMMA]
    assert {m: orjson.loads(s)["requests"] for m, s in kept.items()} == {MODEL: 1, EMBED: 1}


def zero_pages_of(path: Path, table: str) -> None:
    """Zero the root pages of table and its index: found only when they are read."""
    db = sqlite3.connect(path)
    roots = [r for (r,) in db.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name = ?",
                                      (table,))]
    db.close()
    assert len(roots) == 2
    with open(path, "r+b") as f:
        for page in roots:
            f.seek((page - 1) * PAGE)
            f.write(bytes(PAGE))


def history_without_statistics(path: Path) -> None:
    """Minutes only: loading reads no minutes (they are read for the models in the statistics),
    so the damage there is first met by a write."""
    store = UsageStore(path)
    assert store.open()
    assert store.write({("old/model", 1): [1, 0, 1, 1, 0.1]}, {}, {}, 1)
    store.close()


async def test_damage_first_met_by_a_write_moves_the_file_aside_and_loses_nothing_held(
        emulator, tmp_path, http, started):
    path = tmp_path / "history.sqlite3"
    history_without_statistics(path)
    zero_pages_of(path, "usage_minutes")
    proxy = await started(config_for(tmp_path, emulator.url, path, flush_interval_s=0.05))
    assert (await persistence(http, proxy.url))["damage"] == []
    await chat(http, proxy.url)                             # its minute is written...
    await proxy.wait_for_line("fresh one started")          # ...into the damage
    (found,) = (await persistence(http, proxy.url))["damage"]
    assert found["found"] == "writing"
    moved = sqlite3.connect(found["moved_to"])              # kept, its damage with it
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        moved.execute("SELECT * FROM usage_minutes").fetchall()
    moved.close()
    await chat(http, proxy.url, GEMMA)
    await stop(proxy)
    assert requests_in(path) == {MODEL: 1, GEMMA: 1}        # the failed write was not lost
    store = UsageStore(path)   # what the damaged file took before (the load of MODEL) too
    assert store.open()
    assert sorted(o["model"] for o in store.load(emulator.url)["owned"].values()) == [
        GEMMA, MODEL]
    store.close()
    assert sum("damaged" in ln for ln in proxy.lines) == 1  # once, not at every flush


def test_a_fresh_file_damaged_too_stops_the_writes_and_keeps_both_files(tmp_path):
    """A disk that damages the file the proxy just started is failing: no file per flush."""
    path = tmp_path / "history.sqlite3"
    history_without_statistics(path)
    zero_pages_of(path, "usage_minutes")
    store = UsageStore(path)
    assert store.open() and store.load()["stats"] == {}
    assert not store.write({("m", 2): [1, 0, 1, 1, 0.1]}, {}, {}, 2)
    assert store.ok and store.generation == 1
    # Another connection writes and checkpoints, so that the store reads the file again.
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("INSERT INTO usage_minutes VALUES ('x', 1, 1, 0, 0, 0, 0)")
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    other.close()
    zero_pages_of(path, "usage_minutes")
    assert not store.write({("m", 2): [1, 0, 1, 1, 0.1]}, {}, {}, 2)
    assert not store.ok and "malformed" in store.error
    assert not store.write({("m", 3): [1, 0, 1, 1, 0.1]}, {}, {}, 3)   # no more tries
    store.close()
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("history.sqlite3.corrupt")
             and not p.name.endswith(("-wal", "-shm"))]
    assert len(moved) == 1
    assert path.exists()                                    # the second one is kept in place


async def test_each_hosts_history_file_reports_its_own_damage(make_emulator, make_proxy,
                                                              tmp_path, http):
    from proxy.fleet.hosts import host_storage_path

    from .test_fleet import fleet_config
    emus = {n: await make_emulator() for n in ("mac", "pc")}
    config = fleet_config([(n, e.url, 64) for n, e in emus.items()],
                          storage={"enabled": True, "path": str(tmp_path / "history.sqlite3")})
    damaged = host_storage_path(config, "pc")
    damaged.write_bytes(b"not a database" * 100)
    proxy = await make_proxy("", config=config)
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        hosts = (await r.json())["hosts"]
    assert hosts["mac"]["persistence"]["damage"] == []
    (found,) = hosts["pc"]["persistence"]["damage"]
    assert hosts["pc"]["persistence"]["ok"] is True and found["found"] == "opening"
    assert found["moved_to"].startswith(f"{damaged}.corrupt-")
