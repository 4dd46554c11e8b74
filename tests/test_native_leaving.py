"""LM Studio SDK clients that leave mid-prediction or mid-load, with the real `lmstudio` SDK.

Leaving is the client's doing, never the model's: a prediction cut so counts as client_closed,
a load cut so leaves the model unloaded for the next request to load afresh. The abrupt cases
run the SDK in a subprocess that is killed (SIGKILL): the kernel drops its socket with no
websocket close, as when a client process dies.
"""
from __future__ import annotations

import asyncio
import sys
from typing import Any, AsyncIterator

import lmstudio
import pytest

from proxy.emulator import GB

SMALL, MID = "qwen/qwen3-4b", "google/gemma-3-12b"     # 3.1, 9.4 GB
pytestmark = pytest.mark.timeout(60)

# Does one SDK thing, says so on stdout once it is under way, and waits to be killed.
CHILD = """
import sys, time, lmstudio
client = lmstudio.Client(sys.argv[1])
if sys.argv[2] == "stream":
    stream = client.llm.model(sys.argv[3]).respond_stream("a long story")
    next(iter(stream))
    print("streaming", flush=True)
else:
    print("loading", flush=True)
    client.llm.load_new_instance(sys.argv[3])
    print("loaded", flush=True)
time.sleep(60)
"""


def host(url: str) -> str:
    return url.split("//", 1)[1]


@pytest.fixture
async def child() -> AsyncIterator[Any]:
    """Start the SDK in a subprocess; returns it once it printed its first line."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(proxy: Any, what: str, model: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, host(proxy.url), what, model,
            stdout=asyncio.subprocess.PIPE)
        procs.append(proc)
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.decode().strip() in ("streaming", "loading")
        return proc
    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def killed(proc: asyncio.subprocess.Process) -> None:
    proc.kill()                                             # SIGKILL: no websocket close
    await proc.wait()


async def recorded(proxy: Any, key: str, requests: int) -> None:
    """Wait (with a deadline) until the proxy has recorded this many requests for key."""
    async with asyncio.timeout(10):
        while proxy.engine.usage(key).requests < requests:
            await asyncio.sleep(0.01)


def counts(proxy: Any, key: str) -> tuple[int, int, int]:
    u = proxy.engine.usage(key)
    return u.requests, u.failures, u.client_closed


# -- mid-prediction --------------------------------------------------------------------------
async def test_the_sync_client_closed_mid_stream_is_client_closed(proxy, emulator):
    emulator.state.faults.stream_gate = asyncio.Event()    # generating, paused after a token

    def close_mid_stream() -> None:
        client = lmstudio.Client(host(proxy.url))
        stream = client.llm.model(SMALL).respond_stream("hello")
        next(iter(stream))
        client.close()
    await asyncio.to_thread(close_mid_stream)
    await recorded(proxy, SMALL, 1)
    assert counts(proxy, SMALL) == (1, 0, 1)
    assert proxy.engine.entry(SMALL).leases == 0


async def test_a_client_killed_mid_stream_is_client_closed(proxy, emulator, child):
    emulator.state.faults.stream_gate = asyncio.Event()
    await killed(await child(proxy, "stream", SMALL))
    await recorded(proxy, SMALL, 1)
    assert counts(proxy, SMALL) == (1, 0, 1)
    assert proxy.engine.entry(SMALL).leases == 0


# -- mid-load --------------------------------------------------------------------------------
async def lab(make_emulator, make_proxy, **overrides: Any) -> tuple[Any, Any]:
    emulator = await make_emulator(capacity_bytes=20 * GB)
    proxy = await make_proxy(emulator.url, **{"memory.budget_gb": 20, **overrides})
    return emulator, proxy


async def left_loading(proxy: Any, key: str) -> None:
    """Wait (with a deadline) until the engine no longer has key loading."""
    async with asyncio.timeout(10):
        while proxy.engine.entry(key).status.value == "loading":
            await asyncio.sleep(0.01)


async def test_a_client_killed_mid_load_leaves_the_model_unloaded_for_the_next_request(
        make_emulator, make_proxy, child, http):
    emulator, proxy = await lab(make_emulator, make_proxy)
    gate = emulator.state.faults.load_gate[MID] = asyncio.Event()   # LM Studio is loading it
    proc = await child(proxy, "load", MID)
    await emulator.state.wait_for(lambda: emulator.state.loading[MID] == 1)
    await killed(proc)
    await left_loading(proxy, MID)
    e = proxy.engine.entry(MID)
    assert (e.status.value, e.load_failures, e.last_error) == ("unloaded", 0, None)
    gate.set()
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": MID, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status == 200                              # a fresh load, no backoff
    assert emulator.state.load_calls[MID] == 2 and proxy.engine.entry(MID).owner == "proxy"
    assert counts(proxy, MID) == (1, 0, 0)


async def test_a_request_waiting_on_a_load_its_client_left_gets_a_load_of_its_own(
        make_emulator, make_proxy, child):
    emulator, proxy = await lab(make_emulator, make_proxy)
    gate = emulator.state.faults.load_gate[MID] = asyncio.Event()
    proc = await child(proxy, "load", MID)
    await emulator.state.wait_for(lambda: emulator.state.loading[MID] == 1)
    waiter = asyncio.create_task(proxy.engine.acquire(MID))   # an OpenAI request meanwhile
    async with asyncio.timeout(10):
        while not proxy.engine.entry(MID).waiting:
            await asyncio.sleep(0.01)
    await killed(proc)
    await emulator.state.wait_for(lambda: emulator.state.load_calls[MID] == 2)
    gate.set()
    (await asyncio.wait_for(waiter, 10)).release()
    assert proxy.engine.entry(MID).owner == "proxy" and list(emulator.state.instances) == [MID]


@pytest.mark.parametrize("mode, kept", [("after_disconnect", False), ("never", True)])
async def test_a_load_lm_studio_finishes_after_its_client_left_follows_native_evict(
        make_emulator, make_proxy, child, mode, kept):
    """The client never heard of it: under after_disconnect it is the proxy's, and with
    nobody asking for it, it goes at once; under never it is left alone, as LM Studio's."""
    emulator, proxy = await lab(make_emulator, make_proxy, **{"native.evict": mode})
    gate = emulator.state.faults.load_gate[MID] = asyncio.Event()
    proc = await child(proxy, "load", MID)
    await emulator.state.wait_for(lambda: emulator.state.loading[MID] == 1)
    await killed(proc)
    await left_loading(proxy, MID)
    gate.set()
    await emulator.state.load(MID)                         # LM Studio finished it anyway
    await proxy.engine.reconcile()
    e = proxy.engine.entry(MID)
    assert (MID in emulator.state.instances) is kept and e.load_failures == 0
    if kept:
        assert e.owner == "external" and e.status.value == "loaded"
    else:
        assert e.evictions["abandoned"] == 1 and e.status.value == "unloaded"
