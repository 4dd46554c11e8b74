"""The real `lmstudio` Python SDK through the proxy, against the emulator's native protocol.

The SDK's AsyncClient runs on the test's loop next to the proxy and the emulator; its sync
Client (a thread of its own) is run with asyncio.to_thread.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import aiohttp
import lmstudio
import orjson
import pytest

from proxy.emulator import EmulatorOptions
from proxy.emulator import generation as gen

LLM = "qwen/qwen3-4b"
EMBED = "text-embedding-nomic-embed-text-v1.5"


def host(url: str) -> str:
    return url.split("//", 1)[1]


@pytest.fixture
async def client(proxy) -> AsyncIterator[lmstudio.AsyncClient]:
    async with lmstudio.AsyncClient(host(proxy.url)) as c:
        yield c


async def test_the_greeting_is_lm_studios(proxy, http):
    async with http.get(f"{proxy.url}/lmstudio-greeting") as r:
        assert r.status == 200 and await r.json() == {"lmstudio": True}


async def test_lists_downloaded_and_loaded_models(client, emulator, http):
    async with http.post(f"{emulator.url}/api/v1/models/load", json={"model": LLM}) as r:
        assert r.status == 200                              # loaded over REST
    downloaded = await client.system.list_downloaded_models()
    loaded = await client.llm.list_loaded()
    assert {m.model_key for m in downloaded} == set(emulator.state.catalog)
    assert [m.identifier for m in loaded] == [LLM]


async def test_load_new_instance_reports_progress_and_is_its_clients(client, emulator, proxy):
    progress: list[float] = []
    model = await client.llm.load_new_instance(LLM, on_load_progress=progress.append)
    assert model.identifier == LLM and progress[-1] == 1.0
    assert emulator.state.instances[LLM].ttl_s == 3600     # the SDK's TTL reached LM Studio
    assert proxy.engine.entry(LLM).owner.startswith("sdk:")


async def test_an_instance_identifier_of_the_clients_choice(client, emulator, proxy):
    model = await client.llm.load_new_instance(LLM, "my-qwen")
    assert model.identifier == "my-qwen" and list(emulator.state.instances) == ["my-qwen"]
    assert proxy.engine.entry(LLM).instance_ids == ("my-qwen",)


async def test_a_model_the_sdk_loads_is_loaded_for_rest_too(client, emulator, http):
    await client.llm.load_new_instance(LLM)
    async with http.get(f"{emulator.url}/api/v1/models") as r:
        models = {m["key"]: m for m in (await r.json())["models"]}
    assert [i["id"] for i in models[LLM]["loaded_instances"]] == [LLM]


async def test_a_cancelled_prediction_stops_and_lets_go_of_its_model(client, emulator, proxy):
    emulator.state.faults.stream_gate = asyncio.Event()
    model = await client.llm.model(LLM)
    stream = await model.respond_stream("hello")
    leases = []
    async for _ in stream:                                  # the gate holds it after one
        leases.append(proxy.engine.entry(LLM).leases)
        await stream.cancel()                               # a channelSend, relayed
    assert stream.result().stats.stop_reason == "userStopped"
    assert leases == [1] and proxy.engine.entry(LLM).leases == 0


async def test_a_streamed_respond(client, emulator):
    model = await client.llm.model(LLM)
    stream = await model.respond_stream("how much memory is free")
    fragments = [f.content async for f in stream]
    result = stream.result()
    assert "".join(fragments) == result.content and len(fragments) == 24
    assert result.stats.stop_reason == "eosFound"


async def test_embedding_model_embed(client):
    model = await client.embedding.model(EMBED)
    assert await model.embed("hello") == gen.embed(EMBED, "hello")


async def test_unload(client, emulator, proxy):
    model = await client.llm.load_new_instance(LLM)
    await model.unload()
    assert await client.llm.list_loaded() == [] and not emulator.state.instances
    assert proxy.engine.entry(LLM).status.value == "unloaded"   # known before the SDK heard


async def test_a_second_instance_is_known_to_the_engine_when_the_sdk_has_it(client, proxy):
    await client.llm.load_new_instance(LLM)
    second = await client.llm.load_new_instance(LLM)
    assert second.identifier == f"{LLM}:2"
    assert proxy.engine.entry(LLM).instance_ids == (LLM, f"{LLM}:2")


async def test_an_unknown_model_is_the_sdks_not_found_error(client):
    with pytest.raises(lmstudio.LMStudioModelNotFoundError):
        await client.llm.model("nobody/nothing")


async def test_the_sync_client_as_in_the_issue(proxy):
    def session() -> list[str]:
        with lmstudio.Client(host(proxy.url)) as c:
            return [m.model_key for m in c.list_downloaded_models()]
    assert LLM in await asyncio.to_thread(session)


# -- the websocket itself, frame by frame (LM Studio 0.4 tokens) ----------------------------
async def first_reply(url: str, ns: str, auth: dict[str, Any]) -> Any:
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{url}/{ns}") as ws:
        await ws.send_str(orjson.dumps(auth).decode())
        return orjson.loads((await ws.receive()).data)


@pytest.mark.parametrize("passkey, success", [("p4ss", True), ("wrong", False)])
async def test_auth_frames_reach_lm_studio_untouched(make_emulator, make_proxy, passkey,
                                                     success):
    emulator = await make_emulator(options=EmulatorOptions(api_token="sk-lm-abc:p4ss"))
    proxy = await make_proxy(emulator.url)
    reply = await first_reply(proxy.url, "system", {
        "authVersion": 1, "clientIdentifier": "sk-lm-abc", "clientPasskey": passkey})
    assert reply["success"] is success


async def test_no_lm_studio_behind_is_a_refused_websocket(make_proxy):
    proxy = await make_proxy("http://127.0.0.1:9")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await first_reply(proxy.url, "llm", {})
    assert refused.value.status == 502


async def rpc(url: str, ns: str, endpoint: str, parameter: Any) -> Any:
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{url}/{ns}") as ws:
        await ws.send_str(orjson.dumps({"authVersion": 1, "clientIdentifier": "t",
                                        "clientPasskey": "t"}).decode())
        await ws.receive()
        await ws.send_str(orjson.dumps({"type": "rpcCall", "endpoint": endpoint, "callId": 7,
                                        "parameter": parameter}).decode())
        return orjson.loads((await ws.receive()).data)


async def test_instance_processing_state(proxy, emulator):
    await emulator.state.load(LLM)
    reply = await rpc(proxy.url, "llm", "getInstanceProcessingState", {
        "specifier": {"type": "query", "query": {"identifier": LLM}}})
    assert reply == {"type": "rpcResult", "callId": 7,
                     "result": {"status": "idle", "queued": 0}}


async def test_no_lm_studio_behind_is_no_greeting(make_proxy, http):
    proxy = await make_proxy("http://127.0.0.1:9")
    async with http.get(f"{proxy.url}/lmstudio-greeting") as r:
        assert r.status == 502 and (await r.json())["error"]["code"] == "upstream_unreachable"


async def test_lm_studio_going_away_closes_the_clients_websocket(make_emulator, make_proxy):
    emulator = await make_emulator()
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{proxy.url}/system") as ws:
        await ws.send_str(orjson.dumps({"authVersion": 1, "clientIdentifier": "t",
                                        "clientPasskey": "t"}).decode())
        await ws.receive()
        await asyncio.wait_for(emulator.close(), 3)        # LM Studio quits
        msg = await asyncio.wait_for(ws.receive(), 3)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY


async def test_shutting_the_proxy_down_closes_sdk_connections_at_once(proxy):
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{proxy.url}/system") as ws:
        await ws.send_str(orjson.dumps({"authVersion": 1, "clientIdentifier": "t",
                                        "clientPasskey": "t"}).decode())
        await ws.receive()
        await asyncio.wait_for(proxy.served.close(), 3)     # not its 5 s shutdown timeout
        msg = await asyncio.wait_for(ws.receive(), 3)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY


# -- frame size (native.max_frame_bytes) -----------------------------------------------------
async def authed(session: aiohttp.ClientSession, url: str, ns: str
                 ) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(f"{url}/{ns}", max_msg_size=0)
    await ws.send_str(orjson.dumps({"authVersion": 1, "clientIdentifier": "t",
                                    "clientPasskey": "t"}).decode())
    assert orjson.loads((await ws.receive()).data) == {"success": True}
    return ws


async def test_a_frame_too_big_from_the_client_closes_with_1009(make_emulator, make_proxy):
    emulator = await make_emulator()
    proxy = await make_proxy(emulator.url, **{"native.max_frame_bytes": 1 << 20})
    async with aiohttp.ClientSession() as s:
        ws = await authed(s, proxy.url, "system")
        await ws.send_str(orjson.dumps({"type": "rpcCall", "endpoint": "version", "callId": 1,
                                        "parameter": "x" * (2 << 20)}).decode())
        msg = await ws.receive()
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_a_frame_too_big_from_lm_studio_closes_with_1009(make_emulator, make_proxy):
    emulator = await make_emulator()
    proxy = await make_proxy(emulator.url, **{"native.max_frame_bytes": 1 << 20})
    name = "m" * (600 << 10)      # LM Studio's not-found answer names it twice: 1.2 MiB
    async with aiohttp.ClientSession() as s:
        ws = await authed(s, proxy.url, "llm")
        await ws.send_str(orjson.dumps({"type": "rpcCall", "endpoint": "unloadModel",
                                        "callId": 1, "parameter": {"identifier": name}}
                                       ).decode())
        msg = await ws.receive()
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_frames_up_to_the_limit_pass_both_ways(make_emulator, make_proxy):
    emulator = await make_emulator()
    proxy = await make_proxy(emulator.url, **{"native.max_frame_bytes": 1 << 20})
    name = "m" * (400 << 10)      # the answer: 0.8 MiB
    async with aiohttp.ClientSession() as s:
        ws = await authed(s, proxy.url, "llm")
        await ws.send_str(orjson.dumps({"type": "rpcCall", "endpoint": "unloadModel",
                                        "callId": 1, "parameter": {"identifier": name}}
                                       ).decode())
        reply = orjson.loads((await ws.receive()).data)
    assert reply["type"] == "rpcError" and name in reply["error"]["title"]
