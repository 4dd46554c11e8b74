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
