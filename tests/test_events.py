"""The event stream: snapshot, order of a load/evict sequence, resume, slow clients, summaries."""
from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from proxy.emulator import CatalogModel
from proxy.server.keys import EVENTS, HEALTH
from proxy.store import UsageStore

from .fakes import GB
from .sse import SseReader

A, B = "lab/a", "lab/b"
TWO = [CatalogModel(key=k, size_bytes=10 * GB, memory_bytes=10 * GB, load_time_s=0.0)
       for k in (A, B)]
ENGINE_EVENTS = ("state", "load", "evict", "unload")


@pytest.fixture
async def small(make_emulator, make_proxy):
    """Two 10 GB models under a 16 GB budget: loading one evicts the other."""
    emu = await make_emulator(catalog=TWO, capacity_bytes=64 * GB)
    return await make_proxy(emu.url, **{"memory.budget_gb": 16, "eviction.queue_timeout_s": 2,
                                        "models": {k: {"footprint_gb": 10} for k in (A, B)}})


async def chat(http, proxy, model):
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": model, "max_tokens": 2, "messages": []}) as r:
        await r.read()
        return r.status


def story(events):
    out = []
    for e in events:
        if e.type == "state":
            out.append(("state", e.data["model"], e.data["old"], e.data["new"]))
        elif e.type == "load":
            out.append(("load", e.data["model"], e.data["ok"]))
        elif e.type in ("evict", "unload"):
            out.append((e.type, e.data["model"], e.data["reason"], e.data.get("for_model")))
    return out


async def test_a_new_client_gets_a_snapshot_first(small, http):
    async with http.get(f"{small.url}/proxy/events") as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        first = await SseReader(r).next()
    assert first.type == "snapshot" and first.id is None
    assert [m["model"] for m in first.data["models"]] == [A, B]
    assert first.data["memory"]["total_bytes"] == 16 * GB
    assert first.data["id"] == small.app[EVENTS].last_id


async def test_event_order_for_a_load_then_an_eviction(small, http):
    async with http.get(f"{small.url}/proxy/events") as r:
        events = SseReader(r)
        await events.next()
        assert await chat(http, small, A) == 200
        assert await chat(http, small, B) == 200
        seen = await events.until(lambda e: e.type == "load" and e.data["model"] == B)
    assert story(seen) == [
        ("state", A, "unloaded", "loading"), ("state", A, "loading", "loaded"),
        ("load", A, True),
        ("evict", A, "admission", B),
        ("state", A, "loaded", "unloading"), ("state", A, "unloading", "unloaded"),
        ("unload", A, "admission", None),
        ("state", B, "unloaded", "loading"), ("state", B, "loading", "loaded"),
        ("load", B, True)]
    load_b = seen[-1].data
    assert load_b["footprint_bytes"] == 10 * GB and load_b["duration_s"] >= 0


async def test_last_event_id_resumes_from_the_ring(small, http):
    async with http.get(f"{small.url}/proxy/events") as r:
        events = SseReader(r)
        await events.next()
        await chat(http, small, A)
        loaded = (await events.until(lambda e: e.type == "load"))[-1]
    async with http.post(f"{small.url}/proxy/models/unload", json={"model": A}) as r:
        assert r.status == 200
    async with http.get(f"{small.url}/proxy/events",
                        headers={"Last-Event-ID": loaded.id}) as r:
        events = SseReader(r)
        missed = await events.until(lambda e: e.type == "unload")
    epoch, n = loaded.id.split("-")
    assert missed[0].id == f"{epoch}-{int(n) + 1}"
    assert story(missed) == [("evict", A, "manual", None),
                             ("state", A, "loaded", "unloading"),
                             ("state", A, "unloading", "unloaded"),
                             ("unload", A, "manual", None)]


@pytest.mark.parametrize("last_id", ["0badc0de-3", "garbage", "{epoch}-999999"])
async def test_an_id_the_ring_cannot_resume_gets_a_snapshot(small, http, last_id):
    last_id = last_id.format(epoch=small.app[EVENTS].epoch)
    async with http.get(f"{small.url}/proxy/events", headers={"Last-Event-ID": last_id}) as r:
        assert (await SseReader(r).next()).type == "snapshot"


async def test_ids_older_than_the_ring_get_a_snapshot(small, http):
    hub = small.app[EVENTS]
    first_id = hub.publish("test", {"i": 0})
    for i in range(hub.ring.maxlen + 1):
        hub.publish("test", {"i": i})
    async with http.get(f"{small.url}/proxy/events",
                        headers={"Last-Event-ID": f"{hub.epoch}-{first_id.n}"}) as r:
        assert (await SseReader(r).next()).type == "snapshot"


async def test_a_slow_client_is_dropped_and_requests_are_unaffected(small, http):
    hub = small.app[EVENTS]
    hub.client_buffer_events = 32
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.setblocking(False)
    host, port = small.url.removeprefix("http://").split(":")
    await asyncio.get_running_loop().sock_connect(slow, (host, int(port)))
    slow.send(b"GET /proxy/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")   # and never read
    await hub.wait_for(lambda: len(hub.clients) == 1)
    async with http.get(f"{small.url}/proxy/events") as r:
        fast = SseReader(r)
        await fast.next()
        pad = "x" * 8000
        for i in range(5000):   # the fast reader keeps up; the slow one's backlog grows
            hub.publish("test", {"i": i, "pad": pad})
            await fast.until(lambda e: e.type == "test" and e.data["i"] == i)
            if i == 100:
                statuses = await asyncio.gather(*(chat(http, small, A) for _ in range(20)))
                assert statuses == [200] * 20
            if hub.dropped_clients:
                break
        assert hub.dropped_clients == 1 and len(hub.clients) == 1
        hub.publish("test", {"i": "after"})
        await fast.until(lambda e: e.data.get("i") == "after")
    slow.close()


async def test_requests_are_summarised_per_model_per_tick(small, http):
    hub = small.app[EVENTS]
    served = []

    def all_three(e: Any) -> bool:
        if e.type == "requests" and A in e.data["models"]:
            served.append(e.data["models"][A]["requests"])
        return sum(served) == 3

    async with http.get(f"{small.url}/proxy/events") as r:
        events = SseReader(r)
        await events.next()
        await chat(http, small, "no-such-model")   # refused before any model: not a request
        for _ in range(3):
            await chat(http, small, A)
        hub.tick()
        seen = await events.until(all_three)
    # the background ticker may have split the requests over two summaries
    summaries = [e.data["models"] for e in seen if e.type == "requests"]
    assert sum(s[A]["completion_tokens"] for s in summaries if A in s) == 6
    last_a = [s[A] for s in summaries if A in s][-1]
    assert last_a["stats"]["requests"] == 3 and last_a["errors"] == 0
    assert not any("__other__" in s for s in summaries)


async def test_memory_is_sent_once_per_tick_when_it_changed(small, http):
    hub = small.app[EVENTS]
    async with http.get(f"{small.url}/proxy/events") as r:
        events = SseReader(r)
        await events.next()
        await chat(http, small, A)
        hub.tick()
        memory = (await events.until(lambda e: e.type == "memory"))[-1].data
        hub.tick()   # nothing changed: no second memory event
        hub.publish("test", {"i": "marker"})
        after = await events.until(lambda e: e.type == "test")
    assert memory["available_bytes"] == 6 * GB and memory["total_bytes"] == 16 * GB
    assert memory["level"] in ("normal", "high") and memory["reserve_bytes"] == 0
    assert [e.type for e in after if e.type == "memory"] == []


async def test_alerts_opening_and_clearing_are_events(small, http, make_emulator):
    health, engine = small.app[HEALTH], small.engine
    async with http.get(f"{small.url}/proxy/events") as r:
        events = SseReader(r)
        await events.next()
        engine.reconciler.upstream_ok, engine.reconciler.upstream_error = False, "refused"
        await health.check()
        opened = (await events.until(lambda e: e.type == "alert"))[-1].data
        await engine.reconcile()
        await health.check()
        cleared = (await events.until(lambda e: e.type == "alert"))[-1].data
    assert opened["status"] == "firing" and opened["alert"]["rule"] == "upstream_unreachable"
    assert cleared["status"] == "resolved" and cleared["alert"]["id"] == "upstream_unreachable"


async def test_the_timeline_shows_residency_and_the_eviction_reason(small, http):
    await chat(http, small, A)
    await chat(http, small, B)
    small.app[EVENTS].tick()
    async with http.get(f"{small.url}/proxy/timeline?hours=1") as r:
        tl = (await r.json())["models"]
    (start, end, load_s, reason), = tl[A]["resident"]
    assert end >= start and reason == "admission" and load_s >= 0
    assert [e[1:] for e in tl[A]["evictions"]] == [["admission", B]]
    assert tl[B]["resident"][0][1] is None      # still resident
    assert tl[A]["density"][0][1] == 1 and tl[B]["density"][0][1] == 1


async def test_the_timeline_reaches_back_into_the_history_store(make_emulator, make_proxy, http,
                                                             tmp_path):
    path = tmp_path / "history.sqlite3"
    minute = int(time.time() // 60) - 180          # three hours ago, before this proxy ran
    store = UsageStore(path)
    assert store.open()
    store.write({(A, minute): [4, 1, 10, 20, 1.0]}, {}, {}, minute + 180)
    store.close()
    emu = await make_emulator(catalog=TWO, capacity_bytes=64 * GB)
    proxy = await make_proxy(emu.url, **{"storage.enabled": True, "storage.path": str(path)})
    async with http.get(f"{proxy.url}/proxy/timeline?hours=6") as r:
        assert (await r.json())["models"][A]["density"] == [[minute * 60, 4, 1]]
    async with http.get(f"{proxy.url}/proxy/timeline?hours=1") as r:
        assert (await r.json())["models"][A]["density"] == []


async def test_timeline_rejects_a_window_beyond_a_day(small, http):
    async with http.get(f"{small.url}/proxy/timeline?hours=48") as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "hours"


async def test_a_runtime_pin_keeps_a_model_from_eviction(make_emulator, make_proxy, http):
    emu = await make_emulator(catalog=TWO, capacity_bytes=64 * GB)
    proxy = await make_proxy(emu.url, **{"memory.budget_gb": 16,
                                         "eviction.queue_timeout_s": 0.2,
                                         "models": {k: {"footprint_gb": 10} for k in (A, B)}})
    await chat(http, proxy, A)
    async with http.post(f"{proxy.url}/proxy/models/pin", json={"model": A, "pinned": True}) as r:
        assert await r.json() == {"model": A, "pinned": True}
    async with http.get(f"{proxy.url}/proxy/models") as r:
        assert {m["model"]: m["pinned"] for m in (await r.json())["data"]}[A] is True
    assert await chat(http, proxy, B) == 503          # A is pinned: B cannot get its memory
    async with http.post(f"{proxy.url}/proxy/models/pin", json={"model": A, "pinned": False}):
        pass
    assert await chat(http, proxy, B) == 200
    assert proxy.engine.loaded_models() == [B]


async def test_pin_needs_a_boolean(small, http):
    async with http.post(f"{small.url}/proxy/models/pin", json={"model": A, "pinned": "yes"}) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "pinned"


async def test_the_dashboard_is_served(small, http):
    async with http.get(f"{small.url}/ui", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == "/ui/"
    async with http.get(f"{small.url}/ui/") as r:
        assert r.status == 200 and "<title>" in await r.text()
    for asset in ("app.js", "style.css"):
        async with http.get(f"{small.url}/ui/{asset}") as r:
            assert r.status == 200, asset


async def test_shutdown_ends_open_event_streams(emulator, http):
    from proxy.app import create_app
    from proxy.server.serving import serve

    from .conftest import proxy_config
    # a drain deadline longer than the test's timeout: only closing the streams ends them
    served = await serve(create_app(proxy_config(emulator.url)), shutdown_timeout_s=600)
    async with http.get(f"{served.url}/proxy/events") as r:
        events = SseReader(r)
        await events.next()
        await served.close()
        with pytest.raises(EOFError):
            await events.next()


async def test_a_runtime_pin_keeps_a_model_from_idling_out(make_emulator, make_proxy, http):
    from proxy.engine.clock import ManualClock
    clock = ManualClock()
    emu = await make_emulator(catalog=TWO, capacity_bytes=64 * GB)
    proxy = await make_proxy(emu.url, app_kwargs={"clock": clock}, models={A: {"ttl_s": 60}})
    await chat(http, proxy, A)
    proxy.engine.pin(A, True)
    clock.advance(61)
    assert await proxy.engine.unload_idle_models() == []
    proxy.engine.pin(A, False)
    assert await proxy.engine.unload_idle_models() == [A]
    evictions = proxy.app[EVENTS].timeline(3600)["models"][A]["evictions"]
    assert [e[1:] for e in evictions] == [["idle", None]]
