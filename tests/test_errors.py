"""Every error the proxy raises is an OpenAI error envelope with the right status."""
from __future__ import annotations

import asyncio
import socket

import orjson
import pytest

from proxy.emulator import EmulatorOptions
from proxy.emulator.catalog import CatalogModel

MODEL = "qwen/qwen3-4b"


async def error_of(resp):
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return resp.status, body["error"]


@pytest.mark.parametrize("data,code,param", [
    (b"{not json", "invalid_request", None),
    (b"[1, 2]", "invalid_request", None),
    (b"", "invalid_request", None),
    (b'{"messages": []}', "invalid_request", "model"),
    (b'{"model": 42}', "invalid_request", "model"),
])
async def test_bad_bodies_are_400(proxy, http, data, code, param):
    async with http.post(f"{proxy.url}/v1/chat/completions", data=data) as resp:
        status, error = await error_of(resp)
    assert status == 400 and error["code"] == code and error["param"] == param
    assert error["type"] == "invalid_request_error"


async def test_a_method_a_route_does_not_take_is_a_specific_405(proxy, http):
    async with http.put(f"{proxy.url}/v1/chat/completions", json={}) as resp:
        status, error = await error_of(resp)
        allow = resp.headers.get("Allow")
        retry = resp.headers.get("x-should-retry")
    assert status == 405 and error["code"] == "method_not_allowed"
    assert error["message"] == "PUT is not allowed on /v1/chat/completions; use POST"
    assert allow == "POST" and retry == "false"   # the same method gets the same answer


async def test_body_over_limit_is_413(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **{"server.max_body_bytes": 2048})
    big = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 4096}]})
    async with http.post(f"{proxy.url}/v1/chat/completions", data=big) as resp:
        status, error = await error_of(resp)
    assert status == 413 and "2048" in error["message"]


async def test_unknown_route_is_404_not_lm_studios_200(proxy, http):
    async with http.post(f"{proxy.url}/v1/nonsense", json={}) as resp:
        status, error = await error_of(resp)
    assert status == 404 and "/v1/nonsense" in error["message"]


async def test_wrong_method_is_405_envelope(proxy, http):
    async with http.get(f"{proxy.url}/v1/chat/completions") as resp:
        status, _ = await error_of(resp)
    assert status == 405


async def test_unknown_model_is_404_with_close_matches(proxy, http):
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": "gemma-3-12b", "messages": []}) as resp:
        status, error = await error_of(resp)
    assert status == 404 and error["code"] == "model_not_found"
    assert "google/gemma-3-12b" in error["message"]


async def test_an_unknown_model_sharing_no_part_of_a_name_gets_no_suggestion(
        make_emulator, make_proxy, http):
    """'nope' was answered "Did you mean: 'broken'?": two scattered letters passed difflib's
    ratio. A suggestion shares a run of three characters (or all of a shorter name)."""
    emu = await make_emulator(catalog=[CatalogModel("broken"), CatalogModel("chat-a"),
                                       CatalogModel("fast")])
    proxy = await make_proxy(emu.url)
    messages = {}
    for name in ("nope", "brokn", "fasd"):
        async with http.post(f"{proxy.url}/v1/chat/completions",
                             json={"model": name, "messages": []}) as resp:
            status, error = await error_of(resp)
        assert status == 404 and error["code"] == "model_not_found"
        messages[name] = error["message"]
    assert messages["nope"] == "The model 'nope' does not exist."
    assert messages["brokn"] == "The model 'brokn' does not exist. Did you mean: 'broken'?"
    assert messages["fasd"] == "The model 'fasd' does not exist. Did you mean: 'fast'?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_upstream_is_502_and_not_ready(make_proxy, http):
    proxy = await make_proxy(f"http://127.0.0.1:{free_port()}")
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": MODEL, "messages": []}) as resp:
        status, error = await error_of(resp)
    assert status == 502 and error["code"] == "upstream_unreachable"
    async with http.get(f"{proxy.url}/readyz") as resp:
        assert resp.status == 503 and (await resp.json())["ready"] is False
    async with http.get(f"{proxy.url}/healthz") as resp:
        assert resp.status == 200


async def test_upstream_timeout_is_504(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **{"upstream.read_timeout_s": 0.2})
    emulator.state.faults.hang_inference = True
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": MODEL, "messages": []}) as resp:
        status, error = await error_of(resp)
    assert status == 504 and error["code"] == "upstream_timeout"


async def test_upstream_errors_pass_through_unchanged(proxy, emulator, http):
    emulator.state.faults.inference_status = 500
    body = orjson.dumps({"model": MODEL, "messages": []})
    async with http.post(f"{emulator.url}/v1/chat/completions", data=body) as resp:
        direct = (resp.status, await resp.read())
    async with http.post(f"{proxy.url}/v1/chat/completions", data=body) as resp:
        assert (resp.status, await resp.read()) == direct
    assert proxy.engine.usage(MODEL).failures == 1


async def test_upstream_token_replaces_client_authorization(make_emulator, make_proxy, http):
    emu = await make_emulator(options=EmulatorOptions(api_token="s3cret"))
    proxy = await make_proxy(emu.url, **{"upstream.api_token": "s3cret"})
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         headers={"Authorization": "Bearer sk-client"},
                         json={"model": MODEL, "messages": [], "max_tokens": 1}) as resp:
        assert resp.status == 200


async def test_without_token_lm_studios_401_passes_through(make_emulator, make_proxy, http):
    emu = await make_emulator(options=EmulatorOptions(api_token="s3cret"))
    proxy = await make_proxy(emu.url)
    async with http.get(f"{proxy.url}/v1/models") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"


async def test_alias_is_rewritten_to_the_real_key(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **{"models": {MODEL: {"aliases": ["fast"]}}})
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": "fast", "messages": [], "max_tokens": 1}) as resp:
        assert resp.status == 200 and (await resp.json())["model"] == MODEL


async def test_upstream_dropping_a_stream_is_recorded_as_failure(proxy, emulator, http):
    emulator.state.faults.drop_stream_after_chunks = 2
    recorded = asyncio.Event()

    class Listener:
        def on_request(self, r):
            recorded.set()
    proxy.engine.add_listener(Listener())
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": MODEL, "messages": [], "stream": True}) as resp:
        body = await resp.read()
    # The cut is told to the client as an OpenAI error event, not a silent truncation.
    last = body.rstrip().rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ") and b'"code":"upstream_error"' in last
    await recorded.wait()
    assert proxy.engine.usage(MODEL).failures == 1

