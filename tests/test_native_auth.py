"""The proxy's keys on LM Studio's own protocol: the real `lmstudio` SDK and raw websockets.

LM Studio itself asks for no token (its default); the proxy has client keys, one of them limited
to one model, and an admin token. What a key may not do is answered by the proxy in the SDK's
own error shape and never reaches LM Studio.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import aiohttp
import lmstudio
import orjson
import pytest

from proxy.emulator import EmulatorOptions
from proxy.server.keys import AUTH
from proxy.native.relay import LOAD_BOOK

SMALL, MID = "qwen/qwen3-4b", "google/gemma-3-12b"
EMBED = "text-embedding-nomic-embed-text-v1.5"
ALICE, BOB, ADMIN = "alice-key", "bob-key", "admin-token"   # alice: SMALL only


def keyed_proxy(make_proxy: Any, url: str, **overrides: Any) -> Any:
    return make_proxy(url, **{"auth.keys": [{"name": "alice", "key": ALICE, "models": [SMALL]},
                                            {"name": "bob", "key": BOB}],
                              "auth.admin_token": ADMIN, **overrides})


async def admin_call(http: Any, proxy: Any, action: str, model: str) -> tuple[int, Any]:
    """POST /proxy/models/<action> with the admin token: (status, JSON body)."""
    async with http.post(f"{proxy.url}/proxy/models/{action}", json={"model": model},
                         headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        return r.status, await r.json()


async def admin_ok(http: Any, proxy: Any, action: str, model: str) -> None:
    status, body = await admin_call(http, proxy, action, model)
    assert status == 200, body


async def extra_instances(client: Any, *identifiers: str) -> None:
    for identifier in identifiers:
        await client.llm.load_new_instance(SMALL, identifier)


@pytest.fixture
async def proxy(make_proxy, emulator) -> Any:
    return await keyed_proxy(make_proxy, emulator.url)


class KeyedClient(lmstudio.AsyncClient):
    """What the refusal tells a Python SDK user to write: the key as the client passkey."""

    def __init__(self, api_host: str, key: str) -> None:
        self._key = key
        super().__init__(api_host)

    def _create_auth_message(self) -> dict[str, Any]:
        return self._format_auth_message(client_key=self._key)


@pytest.fixture
async def sdk() -> AsyncIterator[Any]:
    clients: list[lmstudio.AsyncClient] = []

    async def connect(proxy: Any, key: str | None) -> lmstudio.AsyncClient:
        host = proxy.url.split("//", 1)[1]
        c = lmstudio.AsyncClient(host) if key is None else KeyedClient(host, key)
        await c.__aenter__()
        clients.append(c)
        return c
    yield connect
    for c in clients:
        await c.aclose()


# -- the handshake, as the SDK sees it -------------------------------------------------------
async def test_an_sdk_without_a_key_is_told_how_to_pass_one(proxy, sdk, emulator):
    with pytest.raises(lmstudio.LMStudioServerError) as refused:
        await sdk(proxy, None)
    message = str(refused.value)
    assert "Authentication failed" in message and "needs a client key" in message
    assert "_create_auth_message" in message and "clientPasskey" in message
    assert "not reachable" not in message


async def test_a_wrong_key_is_refused_too(proxy, sdk):
    with pytest.raises(lmstudio.LMStudioServerError, match="needs a client key"):
        await sdk(proxy, "nobody's key")
    assert proxy.app[AUTH].counters.rejected["invalid_key"] == 1


async def test_a_scoped_key_loads_and_predicts_with_its_model(proxy, sdk, emulator):
    client = await sdk(proxy, ALICE)
    model = await client.llm.load_new_instance(SMALL)
    assert (await model.respond("hello")).stats.stop_reason == "eosFound"
    assert proxy.engine.usage(SMALL).requests == 1


# -- model scopes ----------------------------------------------------------------------------
async def test_a_scoped_key_may_not_load_another_model(proxy, sdk, emulator):
    client = await sdk(proxy, ALICE)
    with pytest.raises(lmstudio.LMStudioServerError, match="may not use the model"):
        await client.llm.load_new_instance(MID)
    with pytest.raises(lmstudio.LMStudioServerError, match="model_not_allowed"):
        await client.llm.model(MID)                         # getOrLoad
    assert emulator.state.load_calls[MID] == 0
    # Counted as the HTTP routes count a key refused a model.
    assert proxy.app[AUTH].counters.rejected == {"model_not_allowed": 2}


async def test_a_scoped_key_may_not_embed_with_another_model(proxy, sdk, emulator):
    await emulator.state.load(EMBED)
    with pytest.raises(lmstudio.LMStudioServerError, match="may not use the model"):
        await (await sdk(proxy, ALICE)).embedding.model(EMBED)
    assert (await (await sdk(proxy, BOB)).embedding.model(EMBED)).identifier == EMBED


# -- unloading -------------------------------------------------------------------------------
async def test_a_key_unloads_what_it_loaded(proxy, sdk, emulator):
    client = await sdk(proxy, ALICE)
    model = await client.llm.load_new_instance(SMALL)
    assert proxy.app[LOAD_BOOK].loads["alice"] == {SMALL: proxy.engine.entry(SMALL).owner}
    await model.unload()
    assert SMALL not in emulator.state.instances and proxy.app[LOAD_BOOK].loads["alice"] == {}


async def test_unloading_what_the_admin_pinned_needs_the_admin_token(make_proxy, emulator, sdk,
                                                                     http):
    proxy = await keyed_proxy(make_proxy, emulator.url, **{f"models.{MID}.pinned": True})
    await admin_ok(http, proxy, "load", MID)
    with pytest.raises(lmstudio.LMStudioServerError, match="admin token"):
        await (await sdk(proxy, BOB)).llm.unload(MID)
    assert MID in emulator.state.instances and emulator.state.unload_calls[MID] == 0
    await (await sdk(proxy, ADMIN)).llm.unload(MID)
    assert MID not in emulator.state.instances


async def test_a_key_unloads_an_extra_instance_it_loaded_of_a_model_the_proxy_had_loaded(
        proxy, sdk, emulator, http):
    await admin_ok(http, proxy, "load", SMALL)
    alice = await sdk(proxy, ALICE)
    await alice.llm.load_new_instance(SMALL, "alice-extra")
    with pytest.raises(lmstudio.LMStudioServerError, match="not loaded with this key"):
        await (await sdk(proxy, BOB)).llm.unload("alice-extra")
    await alice.llm.unload("alice-extra")
    assert set(emulator.state.instances) == {SMALL}          # the proxy's own stays
    with pytest.raises(lmstudio.LMStudioServerError, match="not loaded with this key"):
        await alice.llm.unload(SMALL)


async def test_extra_instances_a_key_loads_are_charged_to_the_memory_budget(proxy, sdk, http):
    """Each instance holds a footprint of its own: three of SMALL hold three."""
    await admin_ok(http, proxy, "load", SMALL)
    await extra_instances(await sdk(proxy, ALICE), "one", "two")
    engine = proxy.engine
    e = engine.entry(SMALL)
    assert set(e.instance_ids) == {SMALL, "one", "two"}
    await engine.sample_memory()
    async with http.get(f"{proxy.url}/proxy/stats",
                        headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        stats = await r.json()
    held_gb = 3 * engine.footprint_bytes(e) / 1e9
    assert stats["system_memory"]["available_gb"] == pytest.approx(64 - held_gb, abs=0.01)


async def test_evicting_a_model_frees_all_its_instances_and_no_more_is_evicted(
        make_proxy, emulator, sdk, http):
    """SMALL's three instances hold 9 GB of 15, the embedder 3: an 8 GB load is 5 GB short,
    which SMALL alone covers; charged as one instance (3 GB), the embedder would go too."""
    proxy = await keyed_proxy(make_proxy, emulator.url, **{
        "memory.budget_gb": 15, "memory.max_memory_usage_percent": 100,
        "models": {SMALL: {"footprint_gb": 3}, EMBED: {"footprint_gb": 3},
                   MID: {"footprint_gb": 8}}})
    for model in (SMALL, EMBED):
        await admin_ok(http, proxy, "load", model)
    await extra_instances(await sdk(proxy, ALICE), "one", "two")
    await admin_ok(http, proxy, "load", MID)
    assert sorted(proxy.engine.loaded_models()) == sorted([EMBED, MID])
    assert not emulator.state.instances_of(SMALL)


async def test_an_instance_name_loaded_again_by_another_key_is_that_keys(proxy, sdk, emulator,
                                                                         http):
    await (await sdk(proxy, ALICE)).llm.load_new_instance(SMALL, "x")
    await admin_ok(http, proxy, "unload", SMALL)
    await (await sdk(proxy, BOB)).llm.load_new_instance(SMALL, "x")
    with pytest.raises(lmstudio.LMStudioServerError, match="not loaded with this key"):
        await (await sdk(proxy, ALICE)).llm.unload("x")
    assert "x" in emulator.state.instances


async def test_a_key_may_not_unload_what_another_key_loaded(proxy, sdk, emulator):
    await (await sdk(proxy, BOB)).llm.load_new_instance(SMALL)
    with pytest.raises(lmstudio.LMStudioServerError, match="not loaded with this key"):
        await (await sdk(proxy, ALICE)).llm.unload(SMALL)
    assert SMALL in emulator.state.instances


# -- raw websockets: what the SDKs do not send -----------------------------------------------
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
        async def connect(proxy: Any, ns: str, passkey: str | None,
                          headers: dict[str, str] | None = None) -> tuple[Raw, Any]:
            ws = await session.ws_connect(f"{proxy.url}/{ns}", headers=headers)
            r = Raw(ws)
            await r.send({"authVersion": 1, "clientIdentifier": "raw",
                          "clientPasskey": passkey or "LM Studio's own passkey"})
            return r, await r.receive()
        yield connect


async def test_a_raw_client_without_a_key_gets_the_protocols_string_and_a_close(proxy, raw):
    conn, reply = await raw(proxy, "llm", None)
    assert reply["success"] is False and isinstance(reply["error"], str)
    assert "needs a client key" in reply["error"] and "Authorization: Bearer" in reply["error"]
    assert (await conn.ws.receive()).type is aiohttp.WSMsgType.CLOSE
    assert conn.ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION


async def test_a_client_that_sends_no_auth_frame_is_closed(make_proxy, emulator):
    proxy = await keyed_proxy(make_proxy, emulator.url, **{"server.header_timeout_s": 0.2})
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{proxy.url}/llm") as ws:
        msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert msg.data == aiohttp.WSCloseCode.POLICY_VIOLATION


async def test_no_lm_studio_behind_is_said_once_the_key_is_checked(make_proxy, raw):
    proxy = await keyed_proxy(make_proxy, "http://127.0.0.1:9")
    conn, reply = await raw(proxy, "llm", BOB)
    assert reply["success"] is False and "is not reachable" in reply["error"]
    assert (await conn.ws.receive()).data == aiohttp.WSCloseCode.TRY_AGAIN_LATER


async def test_a_bearer_header_on_the_upgrade_is_a_key(proxy, raw):
    conn, reply = await raw(proxy, "llm", None, {"Authorization": f"Bearer {BOB}"})
    assert reply == {"success": True}


async def test_a_wrong_bearer_header_is_refused_before_the_upgrade(proxy, raw):
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await raw(proxy, "llm", None, {"Authorization": "Bearer wrong"})
    assert refused.value.status == 401


def predict(model: str) -> dict[str, Any]:
    return {"type": "channelCreate", "endpoint": "predict", "channelId": 3,
            "creationParameter": {"modelSpecifier": {"type": "query",
                                                     "query": {"identifier": model}},
                                  "history": {"messages": []},
                                  "predictionConfigStack": {"layers": []}}}


async def test_a_scoped_key_may_not_predict_with_a_model_loaded_for_others(proxy, raw,
                                                                          emulator):
    await emulator.state.load(MID)
    conn, _ = await raw(proxy, "llm", ALICE)
    await conn.send(predict(MID))
    reply = await conn.receive()
    assert reply["type"] == "channelError" and reply["channelId"] == 3
    assert reply["error"]["errorData"] == {"code": "model_not_allowed"}
    assert "'alice'" in reply["error"]["title"] and emulator.state.inference_calls[MID] == 0


async def test_a_scoped_key_must_name_its_model(proxy, raw, emulator):
    await emulator.state.load(MID)
    conn, _ = await raw(proxy, "llm", ALICE)
    anything = predict(MID)
    anything["creationParameter"]["modelSpecifier"]["query"] = {}     # "any loaded model"
    await conn.send(anything)
    assert "name the model" in (await conn.receive())["error"]["title"]


async def test_a_scoped_key_may_not_embed_a_string_with_another_model(proxy, raw, emulator):
    await emulator.state.load(EMBED)
    conn, _ = await raw(proxy, "embedding", ALICE)
    await conn.send({"type": "rpcCall", "endpoint": "embedString", "callId": 4, "parameter": {
        "modelSpecifier": {"type": "query", "query": {"identifier": EMBED}},
        "inputString": "hi"}})
    reply = await conn.receive()
    assert reply["type"] == "rpcError" and reply["callId"] == 4
    assert reply["error"]["errorData"] == {"code": "model_not_allowed"}


@pytest.mark.parametrize("ns", ["plugins", "runtime", "diagnostics"])
async def test_namespaces_that_change_the_host_need_the_admin_token(proxy, raw, ns):
    _, reply = await raw(proxy, ns, BOB)
    assert reply["success"] is False and "admin token" in reply["error"]
    _, reply = await raw(proxy, ns, ADMIN)
    assert reply == {"success": True}


@pytest.mark.parametrize("ns, endpoint, kind", [
    ("repository", "downloadModel", "channelCreate"),
    ("repository", "loginWithPreAuthenticatedKeys", "rpcCall"),
    ("system", "stopHttpServer", "rpcCall")])
async def test_calls_that_change_the_host_need_the_admin_token(proxy, raw, ns, endpoint,
                                                               kind):
    conn, _ = await raw(proxy, ns, BOB)
    await conn.send({"type": kind, "endpoint": endpoint, "callId": 5, "channelId": 5,
                     "parameter": {}, "creationParameter": {}})
    reply = await conn.receive()
    assert reply["type"] in ("rpcError", "channelError")
    assert reply["error"]["errorData"] == {"code": "admin_required"}


async def test_a_key_still_lists_models_and_searches_the_catalogue(proxy, sdk, raw, emulator):
    client = await sdk(proxy, ALICE)
    assert {m.model_key for m in await client.system.list_downloaded_models()} == \
        set(emulator.state.catalog)
    conn, _ = await raw(proxy, "repository", ALICE)
    await conn.send({"type": "rpcCall", "endpoint": "searchModels", "callId": 6,
                     "parameter": {"searchTerm": "qwen"}})
    reply = await conn.receive()                 # the emulator's answer: it got there
    assert reply["error"]["title"] == "Unknown RPC endpoint: repository.searchModels"


async def test_without_client_keys_sdks_are_anonymous_but_the_host_is_the_admins(
        make_proxy, emulator, sdk, raw):
    proxy = await make_proxy(emulator.url, **{"auth.admin_token": ADMIN})
    model = await (await sdk(proxy, None)).llm.load_new_instance(SMALL)
    assert model.identifier == SMALL
    _, reply = await raw(proxy, "runtime", None)
    assert reply["success"] is False and "admin token" in reply["error"]


async def test_the_key_never_reaches_lm_studio_its_own_token_does(make_emulator, make_proxy,
                                                                  sdk):
    emulator = await make_emulator(options=EmulatorOptions(api_token="sk-lm-abc:p4ss"))
    proxy = await keyed_proxy(make_proxy, emulator.url, **{"upstream.api_token":
                                                           "sk-lm-abc:p4ss"})
    client = await sdk(proxy, BOB)               # LM Studio would refuse BOB as its token
    assert (await client.llm.load_new_instance(SMALL)).identifier == SMALL


# -- every way a frame can name a model ------------------------------------------------------
async def test_a_scoped_key_may_not_name_another_model_as_the_draft(proxy, raw, emulator):
    await emulator.state.load(SMALL)
    conn, _ = await raw(proxy, "llm", ALICE)
    speculative = predict(SMALL)
    speculative["creationParameter"]["draftModelKey"] = MID
    await conn.send(speculative)
    reply = await conn.receive()
    assert reply["type"] == "channelError"
    assert reply["error"]["errorData"] == {"code": "model_not_allowed"}
    assert f"'{MID}'" in reply["error"]["title"] and emulator.state.load_calls[MID] == 0


async def test_a_query_by_path_is_not_taken_for_its_identifier(proxy, raw, emulator):
    await emulator.state.load(MID)
    conn, _ = await raw(proxy, "llm", ALICE)
    by_path = predict(SMALL)
    by_path["creationParameter"]["modelSpecifier"]["query"] = {"identifier": SMALL,
                                                               "path": MID}
    await conn.send(by_path)
    reply = await conn.receive()
    assert reply["error"]["errorData"] == {"code": "model_not_allowed"}
    assert "name the model" in reply["error"]["title"]
    assert emulator.state.inference_calls[MID] == 0


async def test_an_instance_reference_is_checked_as_the_model_it_names(proxy, raw, emulator):
    await emulator.state.load(SMALL)
    await emulator.state.load(MID)
    conn, _ = await raw(proxy, "llm", ALICE)
    await conn.send({"type": "rpcCall", "endpoint": "listLoaded", "callId": 1,
                     "parameter": None})
    refs = {i["identifier"]: i["instanceReference"] for i in (await conn.receive())["result"]}
    for channel, model in ((7, MID), (8, SMALL)):
        by_ref = predict(model)
        by_ref["channelId"] = channel
        by_ref["creationParameter"]["modelSpecifier"] = {"type": "instanceReference",
                                                         "instanceReference": refs[model]}
        await conn.send(by_ref)
    refused = await conn.receive()
    assert refused["type"] == "channelError" and refused["channelId"] == 7
    assert f"may not use the model '{MID}'" in refused["error"]["title"]
    while (frame := await conn.receive())["type"] == "channelSend" and \
            frame["message"].get("type") != "success":
        pass
    assert frame["channelId"] == 8 and frame["message"]["type"] == "success", frame
    assert emulator.state.inference_calls[SMALL] == 1
    assert emulator.state.inference_calls[MID] == 0


async def test_a_key_may_not_unload_a_later_load_of_what_it_once_loaded(make_proxy, emulator,
                                                                        sdk, http):
    """The right to unload holds for the same load only: once the model was unloaded and the
    admin loaded it again (pinned), the key that loaded it first needs the admin token."""
    proxy = await keyed_proxy(make_proxy, emulator.url, **{f"models.{SMALL}.pinned": True})
    alice = await sdk(proxy, ALICE)
    await alice.llm.load_new_instance(SMALL)
    await admin_ok(http, proxy, "unload", SMALL)
    await admin_ok(http, proxy, "load", SMALL)
    with pytest.raises(lmstudio.LMStudioServerError, match="not loaded with this key"):
        await alice.llm.unload(SMALL)
    assert SMALL in emulator.state.instances


async def test_a_scoped_key_uses_its_model_under_the_identifier_it_loaded_it_as(proxy, sdk,
                                                                              emulator):
    client = await sdk(proxy, ALICE)
    model = await client.llm.load_new_instance(SMALL, "alice-small")
    assert model.identifier == "alice-small"
    assert (await model.respond("hello")).stats.stop_reason == "eosFound"


async def test_a_scoped_key_may_not_use_another_model_loaded_under_its_models_name(
        proxy, sdk, raw, emulator):
    await (await sdk(proxy, BOB)).llm.load_new_instance(MID, SMALL)   # identifier: SMALL
    conn, _ = await raw(proxy, "llm", ALICE)
    await conn.send(predict(SMALL))
    reply = await conn.receive()
    assert reply["type"] == "channelError", reply
    assert reply["error"]["errorData"] == {"code": "model_not_allowed"}
    assert emulator.state.inference_calls[MID] == 0


async def test_a_prediction_by_an_identifier_counts_for_the_model_loaded_under_it(proxy, sdk,
                                                                                emulator):
    bob = await sdk(proxy, BOB)
    model = await bob.llm.load_new_instance(MID, SMALL)    # MID, under SMALL's name
    await model.respond("hello")
    assert emulator.state.inference_calls[MID] == 1
    assert proxy.engine.usage(MID).requests == 1 and proxy.engine.usage(SMALL).requests == 0


async def test_an_instance_gone_from_the_server_is_not_the_keys_to_unload(proxy, sdk, emulator,
                                                                          http):
    """Bob's extra instance is unloaded by the admin: his book still names it, but what is
    no longer there is answered by the proxy as not his, never forwarded as an unload."""
    bob = await sdk(proxy, BOB)
    await bob.llm.load_new_instance(SMALL, "x")
    await admin_ok(http, proxy, "unload", SMALL)
    assert "x" not in emulator.state.instances
    unloads = dict(emulator.state.unload_calls)
    with pytest.raises(lmstudio.LMStudioServerError, match="not loaded with this key"):
        await bob.llm.unload("x")
    assert dict(emulator.state.unload_calls) == unloads


async def test_a_refusal_names_what_all_of_a_models_instances_hold(make_proxy, emulator, sdk,
                                                                   http):
    """SMALL is pinned with three instances: 9 GB of the 15, and the refusal of an 8 GB load
    says so, not the 3 GB of one instance."""
    proxy = await keyed_proxy(make_proxy, emulator.url, **{
        "memory.budget_gb": 15, "memory.max_memory_usage_percent": 100,
        "models": {SMALL: {"footprint_gb": 3, "pinned": True}, MID: {"footprint_gb": 8}}})
    await admin_ok(http, proxy, "load", SMALL)
    await extra_instances(await sdk(proxy, ALICE), "one", "two")
    status, body = await admin_call(http, proxy, "load", MID)
    message = body["error"]["message"]
    assert status >= 400
    assert f"'{SMALL}' 9.0 GB" in message, message
    assert not emulator.state.instances_of(MID)
