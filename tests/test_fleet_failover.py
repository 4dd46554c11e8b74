"""A host of the fleet dies mid-run (SIGKILL of a real emulator process) and comes back: a
stream it was serving ends with an error event, requests that had no byte yet go to another
host, nothing hangs, and the host is reconciled before it takes traffic again."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator

import orjson
import pytest

from proxy.configload import load_config
from proxy.emulator.catalog import CatalogModel
from tests.emuprocess import EmulatorProcess, emulator_process

pytestmark = pytest.mark.timeout(60)
GB = 10**9
MID = "lab/mid-6b"
CATALOG_YAML = f"""models:
  - key: {MID}
    size_gb: 5
    memory_gb: 5
    load_time_s: 0
"""


@pytest.fixture
async def doomed(tmp_path: Path) -> AsyncIterator[EmulatorProcess]:
    async with emulator_process(tmp_path, CATALOG_YAML) as emu:
        yield emu


async def test_a_host_dies_and_comes_back(doomed, make_emulator, make_proxy, http):
    spare = await make_emulator(catalog=[CatalogModel(key=MID, size_bytes=5 * GB,
                                                      memory_bytes=5 * GB, load_time_s=0.0)])
    proxy = await make_proxy("", config=load_config({
        "upstreams": [{"name": "doomed", "url": doomed.url, "budget_gb": 20},
                      {"name": "spare", "url": spare.url, "budget_gb": 20}],
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100},
        "storage": {"enabled": False}}))
    fleet = proxy.engine
    await fleet.load(MID, host="doomed")

    # A stream the host was serving when it died ends with an error event, not a hang.
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": MID, "stream": True, "max_tokens": 400,
            "messages": [{"role": "user", "content": "tell me a long story"}]}) as r:
        assert r.status == 200 and r.headers["X-Proxy-Host"] == "doomed"
        first = await r.content.readuntil(b"\n\n")
        assert first.startswith(b"data: ")
        doomed.kill()
        rest = await asyncio.wait_for(r.content.read(), 10)
    last = [e for e in rest.split(b"\n\n") if e.startswith(b"data: ")][-1]
    error = orjson.loads(last[len(b"data: "):])["error"]
    assert error["type"] == "server_error"

    # A request that has had no byte goes to the other host (once), and the dead one is
    # left alone after that.
    async def chat() -> tuple[int, Any]:
        async with http.post(f"{proxy.url}/v1/chat/completions", json={
                "model": MID, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]
        }) as r:
            await r.read()
            return r.status, r.headers

    status, headers = await asyncio.wait_for(chat(), 10)
    assert status == 200 and headers["X-Proxy-Host"] == "spare"
    doomed_host = fleet.by_name["doomed"]
    assert doomed_host.suspect and not doomed_host.up
    for _ in range(5):
        status, headers = await asyncio.wait_for(chat(), 10)
        assert status == 200 and headers["X-Proxy-Host"] == "spare"
    assert spare.state.load_calls[MID] == 1

    # It comes back empty: reconciled (the model it held is known gone) before traffic.
    await doomed.start()
    async with asyncio.timeout(15):
        while not doomed_host.up:
            await asyncio.sleep(0.05)
    assert doomed_host.core.registry.entries[MID].status.value == "unloaded"
    status, headers = await chat()
    assert status == 200 and headers["X-Proxy-Host"] == "spare"   # resident there


async def test_a_request_with_no_host_left_fails_fast_naming_the_hosts(doomed, make_proxy,
                                                                       http):
    proxy = await make_proxy("", config=load_config({
        "upstreams": [{"name": "only", "url": doomed.url, "budget_gb": 20}],
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100},
        "storage": {"enabled": False}}))
    await proxy.engine.load(MID)
    doomed.kill()
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": MID, "messages": [{"role": "user", "content": "x"}]}) as r:
        body = await r.json()
    assert r.status == 502 and body["error"]["code"] == "upstream_unreachable"
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": MID, "messages": [{"role": "user", "content": "x"}]}) as r:
        body = await r.json()
    assert r.status == 502 and "'only'" in body["error"]["message"]


async def test_a_cold_model_placed_on_a_dead_host_loads_on_another(doomed, make_emulator,
                                                                   make_proxy, http):
    """The placer chose the dead host (the model's preferred one, not known dead yet): its
    load cannot reach it, so the request is placed once more, elsewhere, and is served."""
    spare = await make_emulator(catalog=[CatalogModel(key=MID, size_bytes=5 * GB,
                                                      memory_bytes=5 * GB, load_time_s=0.0)])
    proxy = await make_proxy("", config=load_config({
        "upstreams": [{"name": "doomed", "url": doomed.url, "budget_gb": 20},
                      {"name": "spare", "url": spare.url, "budget_gb": 20}],
        "models": {MID: {"host": "doomed"}},
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100},
        "storage": {"enabled": False}}))
    doomed.kill()
    for stream in (False, True):
        async with http.post(f"{proxy.url}/v1/chat/completions", json={
                "model": MID, "max_tokens": 2, "stream": stream,
                "messages": [{"role": "user", "content": "x"}]}) as r:
            body = await asyncio.wait_for(r.read(), 10)
            assert r.status == 200 and r.headers["X-Proxy-Host"] == "spare", body
        if not stream:
            assert proxy.engine.by_name["doomed"].suspect
    assert spare.state.load_calls[MID] == 1
