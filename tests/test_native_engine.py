"""Loads, predictions and embeddings over LM Studio's native protocol go through the engine.

The emulator's capacity equals the proxy's budget: a load that LM Studio would get without room
made first fails there, so every passing load here was admitted by the engine first.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any, AsyncIterator

import aiohttp
import lmstudio
import orjson
import pytest

from proxy.emulator import GB, EmulatorOptions
from proxy.errors import InsufficientMemory
from proxy.native import mediate

SMALL, MID, BIG = "qwen/qwen3-4b", "google/gemma-3-12b", "openai/gpt-oss-20b"   # 3.1, 9.4, 13.5 GB
EMBED = "text-embedding-nomic-embed-text-v1.5"


async def lab(make_emulator, make_proxy, budget_gb: float) -> tuple[Any, Any]:
    emulator = await make_emulator(capacity_bytes=int(budget_gb * GB))
    proxy = await make_proxy(emulator.url, **{"memory.budget_gb": budget_gb})
    return emulator, proxy


@pytest.fixture
async def sdk() -> AsyncIterator[Any]:
    clients: list[lmstudio.AsyncClient] = []

    async def connect(proxy: Any) -> lmstudio.AsyncClient:
        c = lmstudio.AsyncClient(proxy.url.split("//", 1)[1])
        clients.append(await c.__aenter__())
        return c
    yield connect
    for c in clients:
        await c.aclose()


async def test_an_sdk_load_that_does_not_fit_evicts_a_cold_model_first(make_emulator,
                                                                         make_proxy, sdk):
    emulator, proxy = await lab(make_emulator, make_proxy, 20)
    (await proxy.engine.acquire(MID)).release()            # the proxy's own, cold
    client = await sdk(proxy)
    model = await client.llm.load_new_instance(BIG)
    assert model.identifier == BIG and list(emulator.state.instances) == [BIG]
    assert emulator.state.unload_calls[MID] == 1
    assert proxy.engine.entry(BIG).owner.startswith("sdk:")


async def test_a_load_that_can_never_fit_is_refused_as_the_sdk_raises_it(make_emulator,
                                                                         make_proxy, sdk):
    emulator, proxy = await lab(make_emulator, make_proxy, 10)
    client = await sdk(proxy)
    with pytest.raises(lmstudio.LMStudioServerError, match="model_too_large"):
        await client.llm.load_new_instance(BIG)
    assert emulator.state.load_calls[BIG] == 0


async def test_get_or_load_is_admitted_too(make_emulator, make_proxy, sdk):
    emulator, proxy = await lab(make_emulator, make_proxy, 10)
    client = await sdk(proxy)
    with pytest.raises(lmstudio.LMStudioServerError, match="model_too_large"):
        await client.llm.model(BIG)
    assert (await client.llm.model(SMALL)).identifier == SMALL
    assert proxy.engine.entry(SMALL).owner.startswith("sdk:")


async def test_models_a_connected_client_loaded_are_not_evicted_as_if_they_were_the_proxys(
        make_emulator, make_proxy, sdk):
    emulator, proxy = await lab(make_emulator, make_proxy, 20)
    client = await sdk(proxy)
    await client.llm.load_new_instance(MID)
    with pytest.raises(lmstudio.LMStudioServerError, match="its SDK client is connected"):
        await client.llm.load_new_instance(BIG)
    assert list(emulator.state.instances) == [MID]


async def gone(proxy: Any, client: lmstudio.AsyncClient) -> None:
    """The client disconnects; wait (with a deadline) until the proxy has seen it go."""
    await client.aclose()
    async with asyncio.timeout(5):
        while proxy.engine.registry.clients:
            await asyncio.sleep(0.01)


async def test_once_its_client_is_gone_an_sdk_loaded_model_is_the_proxys_to_evict(
        make_emulator, make_proxy, sdk):
    emulator, proxy = await lab(make_emulator, make_proxy, 20)
    client = await sdk(proxy)
    await client.llm.load_new_instance(MID)
    await gone(proxy, client)
    (await proxy.engine.acquire(BIG)).release()
    assert list(emulator.state.instances) == [BIG] and emulator.state.unload_calls[MID] == 1


async def test_at_critical_pressure_a_connected_clients_model_may_go(make_emulator, make_proxy,
                                                                    sdk):
    emulator = await make_emulator(capacity_bytes=40 * GB)
    proxy = await make_proxy(emulator.url, **{"memory.budget_gb": 20})
    await (await sdk(proxy)).llm.load_new_instance(MID)
    await emulator.state.load(BIG)                         # outside the proxy: 24 of 20 GB
    await proxy.engine.reconcile()
    await proxy.engine.optimize()
    assert proxy.engine.memory_pressure.value != "critical"
    assert list(emulator.state.instances) == [BIG]         # not ours: LM Studio's


@pytest.mark.parametrize("mode, evicted", [("never", False), ("always", True)])
async def test_native_evict_says_when_sdk_models_may_go(make_emulator, make_proxy, sdk, mode,
                                                         evicted):
    emulator = await make_emulator(capacity_bytes=20 * GB)
    proxy = await make_proxy(emulator.url, **{"memory.budget_gb": 20, "native.evict": mode})
    client = await sdk(proxy)
    await client.llm.load_new_instance(MID)
    if mode == "never":
        await gone(proxy, client)
        with pytest.raises(InsufficientMemory, match=r"native.evict: never"):
            await proxy.engine.acquire(BIG)
    else:                                                  # while still connected
        (await proxy.engine.acquire(BIG)).release()
    assert (MID not in emulator.state.instances) is evicted


async def test_after_its_client_is_gone_its_models_idle_timeout_applies(make_emulator,
                                                                       make_proxy, sdk):
    emulator = await make_emulator()
    proxy = await make_proxy(emulator.url, **{f"models.{SMALL}.ttl_s": 0.001})
    client = await sdk(proxy)
    await client.llm.load_new_instance(SMALL)
    assert await proxy.engine.unload_idle_models() == []   # its client is connected
    await gone(proxy, client)
    assert await proxy.engine.unload_idle_models() == [SMALL]


async def test_a_refusal_never_says_a_load_needs_what_may_be_used(make_emulator, make_proxy,
                                                                  sdk):
    emulator, proxy = await lab(make_emulator, make_proxy, 15.85)   # 2.96 GB left for 3.0
    await (await sdk(proxy)).llm.load_new_instance(MID)
    with pytest.raises(InsufficientMemory) as refused:
        await proxy.engine.acquire(SMALL)
    need, free = re.search(r"needs ([\d.]+) GB, ([\d.]+) GB may be used now",
                           refused.value.message).groups()
    assert (need, free) == ("3.00", "2.96")
    assert "its SDK client is connected" in refused.value.message


async def test_a_load_that_gave_up_as_memory_came_free_is_not_told_it_fits(proxy):
    refusals, e = proxy.engine.scheduler.refusals, proxy.engine.entry(SMALL)
    await proxy.engine.sample_memory()                     # 64 GB, nothing loaded
    message = refusals.insufficient(e, [], " within 120s", retry_after_s=1.0).message
    assert "may be used now" not in message and "came free only as it gave up" in message


async def test_a_native_prediction_is_never_cut_by_an_eviction(make_emulator, make_proxy,
                                                               sdk):
    emulator, proxy = await lab(make_emulator, make_proxy, 20)
    (await proxy.engine.acquire(MID)).release()            # evictable: the proxy's, cold
    emulator.state.faults.stream_gate = gate = asyncio.Event()
    model = await (await sdk(proxy)).llm.model(MID)
    stream = await model.respond_stream("hello")
    fragments = aiter(stream)
    await anext(fragments)                                 # generating, paused by the gate
    queued = asyncio.Event()
    proxy.engine.add_listener(type("L", (), {"on_queue": lambda self, key, n: (
        queued.set() if key == BIG and n else None)})())
    waiting = asyncio.create_task(proxy.engine.acquire(BIG))   # needs MID's memory
    await queued.wait()
    await proxy.engine.scheduler.settled()
    assert MID in emulator.state.instances and emulator.state.cancelled_streams == 0
    gate.set()
    rest = [f async for f in fragments]
    (await waiting).release()                              # MID went once it was done
    assert len(rest) == 23 and stream.result().stats.stop_reason == "eosFound"
    assert emulator.state.cancelled_streams == 0 and list(emulator.state.instances) == [BIG]


async def test_native_requests_count_in_the_statistics(proxy, sdk, http):
    client = await sdk(proxy)
    model = await client.llm.model(SMALL)
    await model.respond("hello there")
    await (await client.embedding.model(EMBED)).embed("hi")
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        rows = (await r.json())["models"]
    assert rows[SMALL]["requests"] == 1 and rows[SMALL]["completion_tokens"] == 24
    assert rows[SMALL]["prompt_tokens"] == 2 and rows[SMALL]["avg_ttft_ms"] is not None
    assert rows[EMBED]["requests"] == 1 and rows[SMALL]["owner"].startswith("sdk:")


# -- raw frames: what the SDKs cannot easily do ----------------------------------------------
class Raw:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(frame).decode())

    async def receive(self) -> Any:
        return orjson.loads((await self.ws.receive()).data)


@pytest.fixture
async def raw() -> AsyncIterator[Any]:
    async with aiohttp.ClientSession() as session:
        async def connect(url: str, ns: str = "llm") -> Raw:
            ws = await session.ws_connect(f"{url}/{ns}")
            r = Raw(ws)
            await r.send({"authVersion": 1, "clientIdentifier": "raw", "clientPasskey": "x"})
            assert (await r.receive())["success"]
            return r
        yield connect


def load_model(key: str, **extra: Any) -> dict[str, Any]:
    return {"type": "channelCreate", "endpoint": "loadModel", "channelId": 1,
            "creationParameter": {"modelKey": key, "loadConfigStack": {"layers": []}, **extra}}


async def test_a_client_gone_mid_load_leaves_the_load_unloaded_not_failed(make_emulator,
                                                                        make_proxy, raw):
    emulator, proxy = await lab(make_emulator, make_proxy, 20)
    emulator.state.faults.load_gate[MID] = asyncio.Event()
    conn = await raw(proxy.url)
    await conn.send(load_model(MID))
    await emulator.state.wait_for(lambda: emulator.state.loading[MID] == 1)
    assert proxy.engine.entry(MID).status.value == "loading"
    await conn.ws.close()
    await asyncio.wait_for(emulator.state.wait_for(
        lambda: proxy.engine.entry(MID).status.value != "loading"), 10)
    e = proxy.engine.entry(MID)
    assert (e.status.value, e.load_failures, e.last_error) == ("unloaded", 0, None)


async def test_a_load_on_another_device_is_not_admitted_against_local_memory(
        make_emulator, make_proxy, raw):
    emulator = await make_emulator()
    proxy = await make_proxy(emulator.url, **{"memory.budget_gb": 10})
    conn = await raw(proxy.url)
    await conn.send(load_model(BIG, deviceIdentifier="linked-mac"))
    replies = [await conn.receive() for _ in range(4)]
    assert replies[-1]["message"]["type"] == "success"     # passed through, not refused
    assert proxy.engine.entry(BIG).status.value != "loading"


async def test_a_held_load_keeps_its_client_alive(make_emulator, make_proxy, raw,
                                                  monkeypatch):
    emulator, proxy = await lab(make_emulator, make_proxy, 20)
    busy = await proxy.engine.acquire(MID)                 # serving: its memory will free
    conn = await raw(proxy.url)
    monkeypatch.setattr(mediate, "KEEPALIVE_S", 0.05)     # a minute, shortened
    await conn.send(load_model(BIG))
    reply = await conn.receive()
    busy.release()
    assert reply == {"type": "channelSend", "channelId": 1,
                     "message": {"type": "progress", "progress": 0.0}}


async def test_metrics_show_the_sdk_as_the_owner_and_count_native_requests(proxy, sdk, http):
    from .test_observability import samples
    model = await (await sdk(proxy)).llm.load_new_instance(SMALL)
    await model.respond("hello")
    async with http.get(f"{proxy.url}/metrics") as r:
        m = samples(await r.text())
    assert m[("proxy_model_owner", (("model", SMALL), ("owner", "sdk")))] == 1
    assert m[("proxy_requests_total", (("endpoint", "lmstudio:predict"), ("model", SMALL),
                                       ("outcome", "success")))] == 1


async def test_against_lm_studio_0_3_loads_pass_through(make_emulator, make_proxy, sdk):
    emulator = await make_emulator(options=EmulatorOptions(version="0.3"))
    proxy = await make_proxy(emulator.url, **{"memory.budget_gb": 10})
    model = await (await sdk(proxy)).llm.load_new_instance(BIG)   # no unload API: no admission
    assert model.identifier == BIG and proxy.engine.entry(BIG).status.value == "loaded"
    assert proxy.engine.entry(BIG).owner == "external"     # LM Studio's to manage, as reconciled


async def test_predictions_multiplexed_on_one_connection_each_hold_and_count(proxy, sdk):
    model = await (await sdk(proxy)).llm.model(SMALL)
    results = await asyncio.gather(*(model.respond(f"question {i}") for i in range(5)))
    assert all(r.stats.stop_reason == "eosFound" for r in results)
    assert proxy.engine.usage(SMALL).requests == 5 and proxy.engine.entry(SMALL).leases == 0


@pytest.mark.parametrize("mode,owner", [("after_disconnect", "proxy"), ("never", "external")])
async def test_an_sdk_loaded_model_is_the_proxys_after_a_restart(make_emulator, make_proxy,
                                                                 sdk, tmp_path, mode, owner):
    """Its client cannot still be connected to a new process: ownership is written at once."""
    emulator = await make_emulator(capacity_bytes=20 * GB)
    storage = {"enabled": True, "path": str(tmp_path / "history.sqlite3"),
               "flush_interval_s": 3600}
    first = await make_proxy(emulator.url, **{"memory.budget_gb": 20, "storage": storage,
                                              "native.evict": mode})
    client = await sdk(first)
    await client.llm.load_new_instance(SMALL)
    assert first.engine.entry(SMALL).owner.startswith("sdk:")
    again = await make_proxy(emulator.url, **{"memory.budget_gb": 20, "storage": storage,
                                              "native.evict": mode})
    assert again.engine.entry(SMALL).owner == owner


async def recorded(proxy: Any, key: str, requests: int) -> None:
    """Wait (with a deadline) until the proxy has recorded this many requests for key."""
    async with asyncio.timeout(5):
        while proxy.engine.usage(key).requests < requests:
            await asyncio.sleep(0.01)


async def test_a_client_that_leaves_mid_prediction_is_no_failure_lm_studio_leaving_is(
        make_emulator, make_proxy, sdk):
    """As for an OpenAI request: a client gone mid-answer counts as client_closed (499), not
    against the model; LM Studio going away under a prediction is a failure."""
    emulator, proxy = await lab(make_emulator, make_proxy, 20)
    emulator.state.faults.stream_gate = asyncio.Event()    # generating, paused after a token
    client = await sdk(proxy)
    stream = await (await client.llm.model(SMALL)).respond_stream("hello")
    await anext(aiter(stream))
    await client.aclose()
    await recorded(proxy, SMALL, 1)
    usage = proxy.engine.usage(SMALL)
    assert (usage.requests, usage.failures, usage.client_closed) == (1, 0, 1)
    assert proxy.engine.entry(SMALL).leases == 0            # its lease went with the client
    again = await sdk(proxy)
    stream = await (await again.llm.model(SMALL)).respond_stream("hello")
    await anext(aiter(stream))
    await asyncio.wait_for(emulator.close(), 3)             # LM Studio quits
    await recorded(proxy, SMALL, 2)
    usage = proxy.engine.usage(SMALL)
    assert (usage.requests, usage.failures, usage.client_closed) == (2, 1, 1)
