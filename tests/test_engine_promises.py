"""The engine keeps its word: what it loaded stays its own through a kill -9 and through a load
that outlived its timeout; a model known not to fit empties nothing; the memory figures follow
every load and unload."""
from __future__ import annotations

import asyncio
import signal
import sqlite3

import pytest
import yaml

from proxy.configload import load_config, replace_config
from proxy.emulator import CatalogModel
from proxy.engine.clock import ManualClock
from proxy.library import ModelMemoryManager
from proxy.errors import InsufficientMemory, ModelLoadFailed, ModelTooLarge, UpstreamTimeout
from proxy.store import MIGRATIONS, UsageStore
from proxy.upstream.lmstudio import LMStudioUpstream

from .fakes import GB
from .test_signals import MODEL, ProxyProcess, write_config

A, B, P, S, U = "lab/a-6g", "lab/b-6g", "lab/pinned-3g", "lab/s-2g", "lab/understated-4g"
# U's 4 GB file needs 14 GB once loaded; with P pinned it never fits the emulator's 16 GB.
CATALOG = [CatalogModel(key=A, size_bytes=6 * GB, memory_bytes=6 * GB),
           CatalogModel(key=B, size_bytes=6 * GB, memory_bytes=6 * GB),
           CatalogModel(key=P, size_bytes=3 * GB, memory_bytes=3 * GB),
           CatalogModel(key=S, size_bytes=2 * GB, memory_bytes=2 * GB),
           CatalogModel(key=U, size_bytes=4 * GB, memory_bytes=14 * GB)]


@pytest.fixture
async def lab(make_emulator):
    return await make_emulator(catalog=CATALOG, capacity_bytes=16 * GB)


@pytest.fixture
async def engine():
    made = []

    async def make(url, *, store=None, clock=None, **sections):
        raw = {"upstream": {"url": url},
               "memory": {"sampler": "budget", "budget_gb": 16, "min_free_memory_gb": 0,
                          "max_memory_usage_percent": 100},
               "eviction": {"hold": 0, "queue_timeout_s": 30},
               "storage": {"enabled": False},
               "models": {A: {"footprint_gb": 6}, B: {"footprint_gb": 6},
                          P: {"footprint_gb": 3, "pinned": True}, S: {"footprint_gb": 2}}}
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        config = load_config(raw)
        mgr = ModelMemoryManager(config=config, upstream=LMStudioUpstream(config.upstream),
                                 owns_upstream=True, store=store, clock=clock or ManualClock())
        await mgr.start()
        made.append(mgr)
        return mgr
    yield make
    for mgr in made:
        await mgr.cleanup()


# -- 8: ownership is committed when the load completes ----------------------------------------
async def test_ownership_survives_a_kill_9_right_after_the_load(emulator, tmp_path, http):
    config = write_config(tmp_path / "proxy.yaml", emulator.url, 0)
    raw = yaml.safe_load(config.read_text())
    raw["storage"] = {"enabled": True, "path": str(tmp_path / "history.sqlite3"),
                      "flush_interval_s": 3600}      # the batched flush never comes
    config.write_text(yaml.safe_dump(raw))
    started = []
    try:
        first = await ProxyProcess.start(config)
        started.append(first)
        await first.ready()
        async with http.post(f"{first.url}/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 200
        first.proc.send_signal(signal.SIGKILL)
        assert await first.proc.wait() == -signal.SIGKILL
        second = await ProxyProcess.start(config)
        started.append(second)
        await second.ready()
        async with http.get(f"{second.url}/proxy/models") as resp:
            (row,) = [m for m in (await resp.json())["data"] if m["model"] == MODEL]
        assert row["state"] == "loaded" and row["owner"] == "proxy"
        async with http.post(f"{second.url}/proxy/clear") as resp:
            assert (await resp.json())["unloaded"] == [MODEL]
        assert not emulator.state.instances
    finally:
        for p in started:
            await p.stop()


async def test_an_unload_is_forgotten_at_once_too(emulator, tmp_path, engine):
    """Else a model a human loads after a crash would pass for the proxy's (same instance id)."""
    store = UsageStore(tmp_path / "history.sqlite3")
    mgr = await engine(emulator.url, store=store)
    (await mgr.acquire(MODEL)).release()
    await mgr.flush()                                # a batch went out since the load
    await mgr.unload_model(MODEL)
    again = UsageStore(store.path)                   # what a crash here would leave
    assert again.open() and again.load(emulator.url)["owned"] == {}
    again.close()


async def test_a_failed_ownership_write_does_not_undo_a_later_unload(emulator, tmp_path,
                                                                    engine):
    mgr = await engine(emulator.url, store=UsageStore(tmp_path / "history.sqlite3"))
    acc = mgr.core.accounting
    acc.remember_owned(mgr.entry(MODEL), "x-1", {})
    mgr.store._db.execute("PRAGMA query_only = 1")   # the disk refuses writes for a while
    write = asyncio.create_task(acc.commit_ownership())
    await asyncio.sleep(0)                           # the write is under way...
    acc.forget_owned(("x-1",))                       # ...when the instance goes
    await write
    mgr.store._db.execute("PRAGMA query_only = 0")
    await mgr.flush()
    again = UsageStore(mgr.store.path)
    assert again.open() and again.load(emulator.url)["owned"] == {}
    again.close()


async def test_a_failed_ownership_write_is_kept_for_the_next_one(emulator, tmp_path, engine):
    mgr = await engine(emulator.url, store=UsageStore(tmp_path / "history.sqlite3"))
    acc = mgr.core.accounting
    acc.remember_owned(mgr.entry(MODEL), "x-1", {})
    mgr.store._db.execute("PRAGMA query_only = 1")   # the disk refuses writes for a while
    await acc.commit_ownership()
    mgr.store._db.execute("PRAGMA query_only = 0")
    await acc.commit_ownership()                     # the next load's or unload's write
    again = UsageStore(mgr.store.path)
    assert again.open() and set(again.load(emulator.url)["owned"]) == {"x-1"}
    again.close()


# -- 9: a load that completes after its timeout is the proxy's -------------------------------
async def test_a_late_load_nobody_waits_for_is_adopted_and_unloaded(lab, engine):
    gate = lab.state.faults.load_gate[A] = asyncio.Event()   # LM Studio stalls...
    mgr = await engine(lab.url, upstream={"load_timeout_s": 0.2})
    with pytest.raises(UpstreamTimeout):
        await mgr.acquire(A)
    gate.set()                                               # ...then finishes anyway
    await lab.state.wait_for(lambda: bool(lab.state.instances_of(A)))
    await mgr.reconcile()
    assert not lab.state.instances_of(A) and lab.state.unload_calls[A] == 1
    assert mgr.entry(A).evictions["abandoned"] == 1


async def test_a_late_load_a_request_finds_is_the_proxys_and_evictable(lab, engine):
    gate = lab.state.faults.load_gate[A] = asyncio.Event()
    mgr = await engine(lab.url, upstream={"load_timeout_s": 0.2})
    with pytest.raises(UpstreamTimeout):
        await mgr.acquire(A)
    gate.set()
    await lab.state.wait_for(lambda: bool(lab.state.instances_of(A)))
    mgr.clock.advance(5)                                     # past the failure's backoff
    (await mgr.acquire(A)).release()                         # adopts it, loads nothing
    assert lab.state.load_calls[A] == 1 and mgr.entry(A).owner == "proxy"
    assert await mgr.clear_all_models() == [A]


async def test_a_late_load_seen_after_the_watch_is_someone_elses(lab, engine):
    gate = lab.state.faults.load_gate[A] = asyncio.Event()
    mgr = await engine(lab.url, upstream={"load_timeout_s": 0.2})
    with pytest.raises(UpstreamTimeout):
        await mgr.acquire(A)
    mgr.clock.advance(3600)                  # an hour later a human loads it in the GUI
    gate.set()
    await lab.state.wait_for(lambda: bool(lab.state.instances_of(A)))
    await mgr.reconcile()
    assert mgr.entry(A).owner == "external" and lab.state.instances_of(A)


# -- 10: a model whose file understates its memory ---------------------------------------------
async def test_an_out_of_memory_refusal_teaches_a_bound_and_stops_the_evicting(lab, engine,
                                                                               tmp_path):
    mgr = await engine(lab.url, store=UsageStore(tmp_path / "history.sqlite3"))
    for key in (P, A, B):
        (await mgr.acquire(key)).release()
    with pytest.raises(ModelLoadFailed) as first:            # evicts A and B, then fails
        await mgr.acquire(U)
    assert "needs more than the 13.0 GB" in first.value.message
    for key in (A, B):
        (await mgr.acquire(key)).release()                   # the clients bring them back
    unloads, loads = sum(lab.state.unload_calls.values()), lab.state.load_calls[U]
    mgr.clock.advance(120)                                   # past the backoff
    with pytest.raises(InsufficientMemory) as again:
        await mgr.acquire(U)
    assert type(again.value) is InsufficientMemory and again.value.status == 503
    assert "'lab/understated-4g' needs more than 13.0 GB" in again.value.message
    assert f"models.{U}.footprint_gb" in again.value.message
    assert sum(lab.state.unload_calls.values()) == unloads   # nothing evicted for it again
    assert lab.state.load_calls[U] == loads                  # nor tried
    assert mgr.entry(A).status.value == "loaded" and mgr.entry(B).status.value == "loaded"


async def test_the_refusal_reaches_the_client_in_openai_shape(lab, make_proxy, http):
    proxy = await make_proxy(lab.url, **{
        "memory.budget_gb": 16, "memory.max_memory_usage_percent": 100,
        f"models.{A}.footprint_gb": 6, f"models.{B}.footprint_gb": 6,
        f"models.{P}.footprint_gb": 3, f"models.{P}.pinned": True})

    async def chat(model):
        async with http.post(f"{proxy.url}/v1/chat/completions", json={
                "model": model, "max_tokens": 2, "messages": []}) as resp:
            return resp.status, await resp.json()
    for key in (P, A, B):
        assert (await chat(key))[0] == 200
    status, body = await chat(U)
    assert status == 503 and body["error"]["code"] == "model_load_failed"
    for key in (A, B):
        assert (await chat(key))[0] == 200
    proxy.engine.entry(U).retry_at_s = 0.0                   # the backoff has passed
    status, body = await chat(U)
    assert status == 503 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "insufficient_memory"
    assert "needs more than 13.0 GB" in body["error"]["message"]
    assert sorted(lab.state.instances) == [A, B, P]


async def test_the_learned_bound_survives_a_restart(lab, engine, tmp_path):
    path = tmp_path / "history.sqlite3"
    first = await engine(lab.url, store=UsageStore(path))
    for key in (P, A, B):
        (await first.acquire(key)).release()
    with pytest.raises(ModelLoadFailed):
        await first.acquire(U)
    await first.cleanup()
    second = await engine(lab.url, store=UsageStore(path))
    for key in (A, B):
        (await second.acquire(key)).release()
    unloads = sum(lab.state.unload_calls.values())
    with pytest.raises(InsufficientMemory, match="needs more than 13.0 GB"):
        await second.acquire(U)
    assert sum(lab.state.unload_calls.values()) == unloads
    row = second.get_memory_stats()["models"][U]
    assert row["footprint_source"] == "refused" and row["footprint_mb"] == 13_000


def test_a_version_3_history_gains_the_bound_and_keeps_its_footprints(tmp_path):
    path = tmp_path / "history.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    for number, (_, script, _) in enumerate(MIGRATIONS[:3]):
        db.executescript(f"BEGIN;{script};PRAGMA user_version={number + 1};COMMIT;")
    db.execute("INSERT INTO footprints VALUES ('u|m|{}', 5e9, 2, 1.5, 2)")
    db.close()
    store = UsageStore(path)
    assert store.open()
    assert store.load("u")["footprints"] == {"u|m|{}": {
        "footprint_bytes": 5e9, "samples": 2, "load_time_s": 1.5, "load_count": 2,
        "footprint_floor_bytes": None}}
    store.close()


async def test_a_model_known_to_fail_is_tried_when_more_is_free_but_evicts_nothing(lab,
                                                                                   engine):
    await lab.state.load(B)                                  # loaded in LM Studio's GUI
    mgr = await engine(lab.url)
    for key in (P, A):
        (await mgr.acquire(key)).release()
    with pytest.raises(ModelLoadFailed, match="more than the 7.0 GB"):
        await mgr.acquire(U)                                 # A went for it; B is not ours
    await lab.state.unload(B)                                # the human frees 6 GB
    await mgr.reconcile()
    (await mgr.acquire(S)).release()                         # 11 GB free: more than 7
    mgr.clock.advance(120)
    with pytest.raises(ModelLoadFailed, match="more than the 11.0 GB"):
        await mgr.acquire(U)                                 # tried as things are...
    assert lab.state.load_calls[U] == 2 and lab.state.instances_of(S)   # ...S kept


async def test_a_model_known_to_fail_that_loads_once_more_is_free_loses_its_bound(lab,
                                                                                   engine):
    await lab.state.load(B)                                  # loaded in LM Studio's GUI
    mgr = await engine(lab.url)
    (await mgr.acquire(A)).release()
    with pytest.raises(ModelLoadFailed, match="more than the 10.0 GB"):
        await mgr.acquire(U)                                 # A went for it; B is not ours
    await lab.state.unload(B)                                # the human frees 6 GB
    await mgr.reconcile()
    mgr.clock.advance(120)
    (await mgr.acquire(U)).release()                         # 16 GB free: it loads
    assert mgr.entry(U).footprint_floor_bytes is None
    assert mgr.get_memory_stats()["models"][U]["footprint_source"] != "refused"


async def test_an_sdk_load_of_a_model_known_to_fail_drops_its_bound_for_good(lab, engine,
                                                                             tmp_path):
    path = tmp_path / "history.sqlite3"
    await lab.state.load(B)                                  # loaded in LM Studio's GUI
    mgr = await engine(lab.url, store=UsageStore(path))
    (await mgr.acquire(A)).release()
    with pytest.raises(ModelLoadFailed, match="more than the 10.0 GB"):
        await mgr.acquire(U)
    await lab.state.unload(B)
    await mgr.reconcile()
    mgr.clock.advance(120)
    load = await mgr.admit_load(U, owner="sdk:1")            # a client's loadModel
    load.loaded((await lab.state.load(U)).instance_id)
    assert mgr.entry(U).footprint_floor_bytes is None
    await mgr.cleanup()
    again = await engine(lab.url, store=UsageStore(path))
    assert again.entry(U).footprint_floor_bytes is None     # not brought back by a restart


async def test_a_refusal_in_more_than_any_model_may_take_evicts_nothing(lab, engine):
    mgr = await engine(lab.url, memory={"max_memory_usage_percent": 80},   # 12.8 GB each
                       models={P: {"footprint_gb": 3}})
    (await mgr.acquire(P)).release()
    with pytest.raises(ModelLoadFailed, match="more than the 13.0 GB"):
        await mgr.acquire(U)
    assert lab.state.load_calls[U] == 1 and lab.state.instances_of(P)
    mgr.clock.advance(120)
    with pytest.raises(ModelTooLarge, match="LM Studio refused to load it with 13.0 GB free"):
        await mgr.acquire(U)


async def test_a_load_asked_for_by_hand_sets_a_wrong_bound_aside(lab, engine):
    """10 GB held by a program the budget cannot see: U is refused with the whole budget free
    for it. Once that memory is back, requests are still refused,
    but a load asked for by hand tries again, and loads it."""
    lab.state.capacity_bytes = 6 * GB
    mgr = await engine(lab.url, models={P: {"footprint_gb": 3}})
    with pytest.raises(ModelLoadFailed, match="more than the 16.0 GB"):
        await mgr.acquire(U)
    lab.state.capacity_bytes = 16 * GB                       # the other program exits
    mgr.clock.advance(120)
    with pytest.raises(InsufficientMemory, match="needs more than 16.0 GB"):
        await mgr.acquire(U)
    assert await mgr.load_model(U)
    assert lab.state.instances_of(U) and lab.state.load_calls[U] == 2
    assert mgr.get_memory_stats()["models"][U]["footprint_source"] != "refused"


async def test_a_revised_footprint_lets_it_evict_again(lab, engine):
    mgr = await engine(lab.url)
    for key in (P, A, B):
        (await mgr.acquire(key)).release()
    with pytest.raises(ModelLoadFailed):
        await mgr.acquire(U)
    (await mgr.acquire(A)).release()
    mgr.config = replace_config(mgr.config, {f"models.{U}.footprint_gb": 14,
                                             f"models.{P}.pinned": False})
    mgr.clock.advance(120)
    (await mgr.acquire(U)).release()                         # evicts what it must, and loads
    assert sorted(lab.state.instances) == [U]
    assert mgr.get_memory_stats()["models"][U]["footprint_source"] == "configured"


# -- 13: memory figures follow loads and unloads -----------------------------------------------
async def test_memory_is_sampled_right_after_an_unload(lab, engine):
    mgr = await engine(lab.url)
    (await mgr.acquire(A)).release()
    assert mgr.last_sample.available_bytes == 10 * GB
    await mgr.unload_model(A)
    assert mgr.last_sample.available_bytes == 16 * GB


async def test_memory_is_sampled_right_after_others_load_and_unload(lab, engine):
    mgr = await engine(lab.url)
    await lab.state.load(A)                                  # in LM Studio's GUI
    await mgr.reconcile()
    assert mgr.last_sample.available_bytes == 10 * GB
    await lab.state.unload_all()
    await mgr.reconcile()
    assert mgr.last_sample.available_bytes == 16 * GB


async def test_memory_is_sampled_right_after_an_sdk_load(lab, engine):
    mgr = await engine(lab.url)
    load = await mgr.admit_load(A, owner="sdk:1")
    assert mgr.last_sample.available_bytes == 16 * GB        # sampled before admission
    await lab.state.load(A)
    load.loaded(A)
    async with asyncio.timeout(5):
        while mgr.last_sample.available_bytes != 10 * GB:
            await asyncio.sleep(0)
