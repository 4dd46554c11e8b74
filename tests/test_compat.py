"""Repairs of LM Studio's OpenAI-compatibility bugs, proved against the emulator's real quirks."""
from __future__ import annotations

import asyncio
import logging
import base64
import struct
import sys
from array import array

import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.server.compat import Compat, count_input_tokens, float32_base64, model_object
from proxy.configload import load_config
from proxy.emulator import EmulatorOptions
from proxy.server.keys import ACCESS_LOG
from proxy.liveconfig import LiveConfig

EMBED = "text-embedding-nomic-embed-text-v1.5"
MODEL = "qwen/qwen3-4b"
INPUT = ["a", "b c"]


def compat_of(**switches: bool) -> Compat:
    return Compat(LiveConfig(load_config({"compat": switches})))


def float32(vector: list[float]) -> list[float]:
    return array("f", vector).tolist()


def decode(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


async def direct_floats(http, emulator) -> list[list[float]]:
    async with http.post(f"{emulator.url}/v1/embeddings", json={
            "model": EMBED, "input": INPUT, "encoding_format": "float"}) as r:
        return [d["embedding"] for d in (await r.json())["data"]]


async def compat_counts(http, proxy) -> dict[str, int]:
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        return (await r.json())["compat"]


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


# -- pure parts --------------------------------------------------------------------------------

def test_base64_is_byte_exact_with_openai_float32_little_endian():
    vector = [0.1, -0.25, 1e-7, 3.4e38]
    assert base64.b64decode(float32_base64(vector)) == struct.pack("<4f", *vector)


def body(data: list, usage: dict | None = None) -> bytes:
    return orjson.dumps({"object": "list", "data": [
        {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(data)],
        "usage": usage or {"prompt_tokens": 2, "total_tokens": 2}})


def test_floats_for_a_base64_request_are_encoded_and_counted():
    compat = compat_of()
    out = compat.repair("/v1/embeddings", {"encoding_format": "base64"}, 200,
                        body([[0.5, -1.0]]))
    assert decode(orjson.loads(out.body)["data"][0]["embedding"]) == [0.5, -1.0]
    assert compat.counts()["embeddings_base64"] == 1


def test_vectors_already_base64_are_not_encoded_twice():
    compat = compat_of()
    raw = body([float32_base64([0.5])])
    out = compat.repair("/v1/embeddings", {"encoding_format": "base64"}, 200, raw)
    assert out.body == raw and compat.counts()["embeddings_base64"] == 0


def test_a_vector_that_is_not_numbers_is_left_as_it_came():
    raw = body([[None, "x"]])
    out = compat_of().repair("/v1/embeddings", {"encoding_format": "base64"}, 200, raw)
    assert out.body is raw


@pytest.mark.parametrize("payload", [{}, {"encoding_format": "float"}])
def test_float_requests_keep_the_upstream_bytes(payload):
    raw = body([[0.5, -1.0]])
    assert compat_of().repair("/v1/embeddings", payload, 200, raw).body is raw


def test_switched_off_base64_repair_leaves_the_floats():
    raw = body([[0.5]])
    out = compat_of(embeddings_base64=False).repair(
        "/v1/embeddings", {"encoding_format": "base64"}, 200, raw)
    assert out.body is raw


def test_errors_and_other_endpoints_are_untouched():
    compat = compat_of()
    raw = body([[0.5]], {"prompt_tokens": 0, "total_tokens": 0})
    assert compat.repair("/v1/embeddings", {"encoding_format": "base64"}, 400, raw).body is raw
    assert compat.repair("/v1/chat/completions", {"input": "x"}, 200, raw).body is raw


def test_zero_usage_is_filled_with_an_estimate():
    compat = compat_of()
    out = compat.repair("/v1/embeddings", {"input": "twelve chars"}, 200,
                        body([[0.5]], {"prompt_tokens": 0, "total_tokens": 0}))
    assert orjson.loads(out.body)["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert out.tokens_estimated and compat.counts()["embedding_usage"] == 1


def test_reported_usage_is_kept():
    raw = body([[0.5]], {"prompt_tokens": 10, "total_tokens": 10})
    assert compat_of().repair("/v1/embeddings", {"input": "x"}, 200, raw).body is raw


@pytest.mark.parametrize("inputs, expected", [
    ("abcdefgh", (2, True)), ("abcdefghi", (3, True)), ("", (0, False)),
    (["a", "", "abcde"], (3, True)), ([5, 6, 7], (3, False)), ([[1, 2], [3]], (3, False)),
    (None, (0, False))])
def test_input_tokens_exact_for_token_ids_estimated_for_text(inputs, expected):
    assert count_input_tokens(inputs) == expected


def test_model_object_from_the_list():
    listed = orjson.dumps({"object": "list", "data": [
        {"id": "qwen/qwen3-4b", "object": "model", "owned_by": "qwen"}]})
    assert model_object(listed, "qwen/qwen3-4b") == {
        "id": "qwen/qwen3-4b", "object": "model", "created": 0, "owned_by": "qwen"}
    assert model_object(listed, "qwen/qwen3-8b") is None
    with pytest.raises(ValueError):
        model_object(b'{"error": "Unexpected endpoint"}', "x")


def test_compat_config_is_validated_by_path():
    assert load_config({"compat": {"embedding_usage": False}}).compat.embedding_usage is False
    with pytest.raises(Exception, match=r"compat\.embeddings_base64: must be true or false"):
        load_config({"compat": {"embeddings_base64": "yes"}})


# -- through the proxy, with the Python SDK ----------------------------------------------------

async def test_python_sdk_base64_gets_the_direct_floats(proxy, emulator, http):
    async with client(proxy.url) as c:
        emb = await c.embeddings.create(model=EMBED, input=INPUT, encoding_format="base64")
    expected = [float32(v) for v in await direct_floats(http, emulator)]
    assert [decode(d.embedding) for d in emb.data] == expected
    assert (await compat_counts(http, proxy))["embeddings_base64"] == 1


async def test_python_sdk_default_decodes_the_repaired_base64(proxy, emulator, http):
    async with client(proxy.url) as c:
        emb = await c.embeddings.create(model=EMBED, input=INPUT)   # asks base64 itself
    expected = [float32(v) for v in await direct_floats(http, emulator)]
    assert [d.embedding for d in emb.data] == expected


@pytest.mark.parametrize("extra", [{}, {"encoding_format": "float"}])
async def test_a_float_request_gets_the_upstream_bytes_unchanged(proxy, emulator, http, extra):
    request = {"model": EMBED, "input": INPUT, **extra}
    async with http.post(f"{proxy.url}/v1/embeddings", json=request) as r:
        via_proxy = await r.read()
    async with http.post(f"{emulator.url}/v1/embeddings", json=request) as r:
        direct = await r.read()
    assert via_proxy == direct


async def test_an_upstream_that_honours_base64_is_not_encoded_twice(make_emulator, make_proxy,
                                                                    http):
    emulator = await make_emulator(options=EmulatorOptions(honour_encoding_format=True))
    proxy = await make_proxy(emulator.url)
    async with client(proxy.url) as c:
        emb = await c.embeddings.create(model=EMBED, input=INPUT, encoding_format="base64")
    expected = [float32(v) for v in await direct_floats(http, emulator)]
    assert [decode(d.embedding) for d in emb.data] == expected
    assert (await compat_counts(http, proxy))["embeddings_base64"] == 0


async def zero_usage_setup(make_emulator, make_proxy, **overrides):
    emulator = await make_emulator(options=EmulatorOptions(zero_embedding_usage=True))
    return await make_proxy(emulator.url, **overrides)


async def test_zero_embedding_usage_is_counted_and_marked_estimated(make_emulator, make_proxy,
                                                                    http):
    proxy = await zero_usage_setup(make_emulator, make_proxy)
    async with client(proxy.url) as c:
        emb = await c.embeddings.create(model=EMBED, input=["four", "eight ch"])
    stats = proxy.engine.usage(EMBED)
    assert emb.usage.prompt_tokens == emb.usage.total_tokens == 3
    assert stats.prompt_tokens == 3 and stats.estimated_tokens == 3
    assert (await compat_counts(http, proxy))["embedding_usage"] == 1


async def test_the_access_log_marks_estimated_embedding_tokens(make_emulator, make_proxy,
                                                                 caplog):
    caplog.set_level(logging.INFO, logger="proxy.request")
    proxy = await zero_usage_setup(make_emulator, make_proxy)
    async with client(proxy.url) as c:
        await c.embeddings.create(model=EMBED, input="four")
    proxy.app[ACCESS_LOG].flush()
    line, = [r.getMessage() for r in caplog.records if r.name == "proxy.request"]
    assert line.endswith("tokens=1/0 (estimated)")


async def test_without_the_repair_zero_usage_passes_through(make_emulator, make_proxy):
    proxy = await zero_usage_setup(make_emulator, make_proxy, **{"compat.embedding_usage": False})
    async with client(proxy.url) as c:
        emb = await c.embeddings.create(model=EMBED, input=["four", "eight ch"])
    assert emb.usage.prompt_tokens == 0 and proxy.engine.usage(EMBED).prompt_tokens == 0


async def test_repairs_are_prometheus_counters(make_emulator, make_proxy, http):
    proxy = await zero_usage_setup(make_emulator, make_proxy)
    async with client(proxy.url) as c:
        await c.embeddings.create(model=EMBED, input="x", encoding_format="base64")
    async with http.get(f"{proxy.url}/metrics") as r:
        text = await r.text()
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in text_string_to_metric_families(text) for s in f.samples}
    assert {k: v for k, v in found.items() if k[0] == "proxy_compat_repairs_total"} == {
        ("proxy_compat_repairs_total", (("kind", "embeddings_base64"),)): 1.0,
        ("proxy_compat_repairs_total", (("kind", "embedding_usage"),)): 1.0,
        ("proxy_compat_repairs_total", (("kind", "models_retrieve"),)): 0.0}
    assert found[("proxy_tokens_total", (("kind", "prompt"), ("model", EMBED)))] == 1.0


async def test_emulator_cli_reports_zero_embedding_usage(http):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.emulator", "--port", "0", "--load-time-scale", "0",
        "--zero-embedding-usage", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        url = line.split(" on ")[1].split()[0]
        async with http.post(f"{url}/v1/embeddings", json={"model": EMBED, "input": "x"}) as r:
            usage = (await r.json())["usage"]
    finally:
        proc.terminate()
        await proc.wait()
    assert usage == {"prompt_tokens": 0, "total_tokens": 0}


# -- models.retrieve ---------------------------------------------------------------------------

async def test_python_sdk_models_retrieve(proxy, http):
    async with client(proxy.url) as c:
        model = await c.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by, model.created) == (MODEL, "model", "qwen", 0)
    assert (await compat_counts(http, proxy))["models_retrieve"] == 1


async def test_python_sdk_models_retrieve_unknown_is_not_found(proxy):
    async with client(proxy.url) as c:
        with pytest.raises(openai.NotFoundError) as info:
            await c.models.retrieve("qwen/nope")
    assert info.value.code == "model_not_found" and "qwen/nope" in info.value.message


async def test_models_retrieve_resolves_a_configured_alias(make_proxy, emulator):
    proxy = await make_proxy(emulator.url, **{"models": {MODEL: {"aliases": ["fast"]}}})
    async with client(proxy.url) as c:
        assert (await c.models.retrieve("fast")).id == MODEL


async def test_models_retrieve_with_an_unencoded_slash(proxy, http):
    async with http.get(f"{proxy.url}/v1/models/{MODEL}") as r:
        assert r.status == 200 and (await r.json())["id"] == MODEL


async def test_models_retrieve_switched_off_is_an_unknown_route(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **{"compat.models_retrieve": False})
    async with http.get(f"{proxy.url}/v1/models/{MODEL}") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_models_retrieve_passes_lm_studios_refusal_through(make_emulator, make_proxy, http):
    emulator = await make_emulator(options=EmulatorOptions(api_token="s3cret"))
    proxy = await make_proxy(emulator.url)
    async with http.get(f"{proxy.url}/v1/models/{MODEL}") as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"


async def test_models_retrieve_with_the_upstream_token(make_emulator, make_proxy):
    emulator = await make_emulator(options=EmulatorOptions(api_token="s3cret"))
    proxy = await make_proxy(emulator.url, **{"upstream.api_token": "s3cret"})
    async with client(proxy.url) as c:
        assert (await c.models.retrieve(MODEL)).id == MODEL
