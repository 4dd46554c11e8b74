"""Facts about a real llama.cpp router that a llama.cpp backend relies on.

Each test pins one behaviour of `llama-server --models-dir … --models-max 0
--no-models-autoload` (built by tests/llama/build.py, over the tiny models of
tests/llama/models.py). When llama.cpp changes one of them, the test says which.
"""
from __future__ import annotations

import json
import signal
from typing import Any, AsyncIterator

import aiohttp
import psutil
import pytest

from tests.llama.fixtures import llama_server_or_skip
from tests.llama.router import LlamaRouter, model_entry, status_is, wait_for_model

llama_server_or_skip(module_level=True)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as r:
        return r.status, await r.json()


async def load(http: aiohttp.ClientSession, router: LlamaRouter, model_id: str) -> dict:
    assert await post(http, router.url + "/models/load", {"model": model_id}) == (
        200, {"success": True})
    return await wait_for_model(http, router.url, model_id, status_is("loaded"))


def chat_body(model_id: str, **extra: Any) -> dict:
    return {"model": model_id, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8, "temperature": 0, "seed": 7, **extra}


async def test_models_lists_every_file_unloaded(llama_router: LlamaRouter, http) -> None:
    async with http.get(llama_router.url + "/models") as r:
        assert r.status == 200
        body = await r.json()
    assert body["object"] == "list"
    m = llama_router.models
    by_id = {e["id"]: e for e in body["data"]}
    assert set(by_id) == {m.chat_small, m.chat_large, m.embedding, m.broken}
    for entry in by_id.values():
        assert entry["object"] == "model" and entry["owned_by"] == "llamacpp"
        assert entry["status"]["value"] == "unloaded"
        # The stopped child's exit code varies (0, or 1 now and then under load), and the router
    # marks an exit code of 1 `failed` even after an unload: only `meta` is a fact here.
    assert "meta" not in entry
    assert by_id[m.chat_small]["source"] == "models_dir"
    # /v1/models is the same list
    async with http.get(llama_router.url + "/v1/models") as r:
        assert [e["id"] for e in (await r.json())["data"]] == [e["id"] for e in body["data"]]


async def test_load_answers_at_once_then_events_show_loading_then_loaded(
        llama_router: LlamaRouter, http) -> None:
    model_id = llama_router.models.chat_small
    async with http.get(llama_router.url + "/models/sse") as events:
        assert events.content_type == "text/event-stream"
        status, body = await post(http, llama_router.url + "/models/load", {"model": model_id})
        assert (status, body) == (200, {"success": True})
        seen = []
        async for line in events.content:
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                assert event["model"] == model_id
                seen.append((event["event"], event["data"]["status"]))
                if event["data"]["status"] == "loaded":
                    assert event["data"]["info"]  # the child's /v1/models entry
                    break
    assert seen[0] == ("model_status", "loading")
    assert seen[-1] == ("status_change", "loaded")
    entry = await model_entry(http, llama_router.url, model_id)
    assert entry["status"]["value"] == "loaded"
    assert entry["meta"]["size"] > 0 and entry["meta"]["n_ctx_train"] == 512


async def test_meta_size_tells_models_apart_and_each_runs_in_its_own_process(
        llama_router: LlamaRouter, http) -> None:
    m = llama_router.models
    small = await load(http, llama_router, m.chat_small)
    large = await load(http, llama_router, m.chat_large)
    assert large["meta"]["size"] > 10 * small["meta"]["size"]
    # A child's command line names its model (`--alias id`); its port is in status.args.
    by_alias = {}
    for child in llama_router.children():
        cmdline = child.cmdline()
        by_alias[cmdline[cmdline.index("--alias") + 1]] = cmdline
    assert set(by_alias) == {m.chat_small, m.chat_large}
    for entry in (small, large):
        args = entry["status"]["args"]
        assert args[args.index("--port") + 1] == by_alias[entry["id"]][
            by_alias[entry["id"]].index("--port") + 1] != "0"


async def test_load_twice_is_400_already_running(llama_router: LlamaRouter, http) -> None:
    model_id = llama_router.models.chat_small
    await load(http, llama_router, model_id)
    status, body = await post(http, llama_router.url + "/models/load", {"model": model_id})
    assert status == 400
    assert body["error"]["message"] == "model is already running"


async def test_unload_answers_then_unloaded_and_the_process_is_gone(
        llama_router: LlamaRouter, http) -> None:
    model_id = llama_router.models.chat_small
    await load(http, llama_router, model_id)
    (child,) = llama_router.children()
    status, body = await post(http, llama_router.url + "/models/unload", {"model": model_id})
    assert (status, body) == (200, {"success": True})
    entry = await wait_for_model(http, llama_router.url, model_id, status_is("unloaded"))
    # The stopped child's exit code varies (0, or 1 now and then under load), and the router
    # marks an exit code of 1 `failed` even after an unload: only `meta` is a fact here.
    assert "meta" not in entry
    assert not child.is_running() or child.status() == "zombie"
    status, body = await post(http, llama_router.url + "/models/unload", {"model": model_id})
    assert (status, body["error"]["message"]) == (400, "model is not running")


async def test_unknown_model(llama_router: LlamaRouter, http) -> None:
    url = llama_router.url
    for bad in ({"model": "nope"}, {}):
        # every 404 of the router's HTTP layer has this one body
        assert await post(http, url + "/models/load", bad) == (404, {"error": {
            "message": "File Not Found", "type": "not_found_error", "code": 404}})
    status, body = await post(http, url + "/models/unload", {"model": "nope"})
    assert (status, body["error"]["message"]) == (400, "model is not found")
    status, body = await post(http, url + "/v1/chat/completions", chat_body("nope"))
    assert (status, body["error"]["message"]) == (400, "model 'nope' not found")


async def test_chat_for_an_unloaded_model_is_400_without_autoload(
        llama_router: LlamaRouter, http) -> None:
    status, body = await post(http, llama_router.url + "/v1/chat/completions",
                              chat_body(llama_router.models.chat_small))
    assert (status, body["error"]["message"]) == (400, "model is not loaded")


async def test_chat_and_streaming_with_usage(llama_router: LlamaRouter, http) -> None:
    model_id = llama_router.models.chat_small
    await load(http, llama_router, model_id)
    status, body = await post(http, llama_router.url + "/v1/chat/completions",
                              chat_body(model_id))
    assert status == 200, body
    content = body["choices"][0]["message"]["content"]
    assert content and content.isprintable()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8

    async with http.post(llama_router.url + "/v1/chat/completions",
                         json=chat_body(model_id, stream=True,
                                        stream_options={"include_usage": True})) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        chunks = [line[5:].strip() async for line in r.content if line.startswith(b"data:")]
    assert chunks[-1] == b"[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in parsed if c["choices"])
    assert streamed == content  # same seed, temperature 0
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"]["completion_tokens"] == 8


async def test_embeddings_from_the_bert_model(llama_router: LlamaRouter, http) -> None:
    model_id = llama_router.models.embedding
    await load(http, llama_router, model_id)
    status, body = await post(http, llama_router.url + "/v1/embeddings",
                              {"model": model_id, "input": ["hello world", "the proxy"]})
    assert status == 200, body
    vectors = [d["embedding"] for d in body["data"]]
    assert len(vectors) == 2 and all(len(v) == 64 for v in vectors) and vectors[0] != vectors[1]


async def test_a_broken_gguf_is_a_failed_load_with_its_exit_code(
        llama_router: LlamaRouter, http) -> None:
    model_id = llama_router.models.broken
    assert await post(http, llama_router.url + "/models/load", {"model": model_id}) == (
        200, {"success": True})
    entry = await wait_for_model(http, llama_router.url, model_id,
                                 lambda e: e["status"].get("failed", False))
    assert entry["status"]["value"] == "unloaded"
    assert entry["status"]["exit_code"] == 1
    assert llama_router.children() == []
    status, body = await post(http, llama_router.url + "/v1/chat/completions",
                              chat_body(model_id))
    assert (status, body["error"]["message"]) == (400, "model is not loaded")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_no_model_process_outlives_the_router(
        llama_router: LlamaRouter, http, sig: int) -> None:
    await load(http, llama_router, llama_router.models.chat_small)
    children = llama_router.children()
    assert children
    llama_router.process.send_signal(sig)
    assert llama_router.process.wait(timeout=10) == (0 if sig == signal.SIGTERM else -sig)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


async def test_a_restarted_router_has_every_model_unloaded(
        llama_router: LlamaRouter, http) -> None:
    model_id = llama_router.models.chat_small
    await load(http, llama_router, model_id)
    url = llama_router.url
    llama_router.restart()
    assert llama_router.url == url
    async with aiohttp.ClientSession() as fresh:  # pooled connections died with the old router
        entry = await model_entry(fresh, url, model_id)
    assert entry["status"]["value"] == "unloaded" and "failed" not in entry["status"]
