"""On-demand loading: one load however many requests race, no duplicates, no head-of-line waits."""
from __future__ import annotations

import asyncio

import orjson

from proxy.emulator import EmulatorOptions

SMALL, LARGE = "qwen/qwen3-4b", "openai/gpt-oss-20b"


def chat(model: str) -> bytes:
    return orjson.dumps({"model": model, "max_tokens": 2,
                         "messages": [{"role": "user", "content": "hi"}]})


async def post(http, url, body):
    async with http.post(url, data=body) as resp:
        return resp.status, await resp.read()


async def test_fifty_concurrent_first_requests_cause_one_load(proxy, emulator, http):
    gate = emulator.state.faults.load_gate[SMALL] = asyncio.Event()
    requests = [asyncio.create_task(post(http, f"{proxy.url}/v1/chat/completions", chat(SMALL)))
                for _ in range(50)]
    await emulator.state.wait_for(lambda: emulator.state.loading[SMALL] == 1)
    gate.set()
    results = await asyncio.gather(*requests)
    assert [status for status, _ in results] == [200] * 50
    assert emulator.state.load_calls[SMALL] == 1
    assert sorted(emulator.state.instances) == [SMALL]   # no "qwen/qwen3-4b:2"


async def test_loaded_model_answers_while_another_loads(proxy, emulator, http):
    assert (await post(http, f"{proxy.url}/v1/chat/completions", chat(SMALL)))[0] == 200
    gate = emulator.state.faults.load_gate[LARGE] = asyncio.Event()
    slow = asyncio.create_task(post(http, f"{proxy.url}/v1/chat/completions", chat(LARGE)))
    await emulator.state.wait_for(lambda: emulator.state.loading[LARGE] == 1)
    status, _ = await post(http, f"{proxy.url}/v1/chat/completions", chat(SMALL))
    assert status == 200 and not slow.done()
    gate.set()
    assert (await slow)[0] == 200


async def test_model_loaded_elsewhere_is_adopted_not_loaded_twice(proxy, emulator, http):
    await emulator.state.load(SMALL)          # e.g. loaded in LM Studio's GUI
    status, _ = await post(http, f"{proxy.url}/v1/chat/completions", chat(SMALL))
    assert status == 200
    assert emulator.state.load_calls[SMALL] == 1 and len(emulator.state.instances) == 1
    assert proxy.engine.entry(SMALL).owned is False


async def test_load_failure_is_503_with_lm_studios_reason(proxy, emulator, http):
    emulator.state.faults.load_fail[SMALL] = "GGUF file is corrupt"
    status, body = await post(http, f"{proxy.url}/v1/chat/completions", chat(SMALL))
    error = orjson.loads(body)["error"]
    assert status == 503 and error["code"] == "model_load_failed"
    assert "GGUF file is corrupt" in error["message"]


async def test_failed_load_backs_off_then_retries(proxy, emulator, http):
    emulator.state.faults.load_fail[SMALL] = "transient"
    await post(http, f"{proxy.url}/v1/chat/completions", chat(SMALL))
    async with http.post(f"{proxy.url}/v1/chat/completions", data=chat(SMALL)) as resp:
        assert resp.status == 503 and "Retry-After" in resp.headers
    assert emulator.state.load_calls[SMALL] == 1   # backing off: no second attempt yet
    del emulator.state.faults.load_fail[SMALL]
    proxy.engine.entry(SMALL).retry_at_s = 0.0     # the backoff has passed
    assert (await post(http, f"{proxy.url}/v1/chat/completions", chat(SMALL)))[0] == 200


async def test_old_lm_studio_falls_back_to_its_jit(make_emulator, make_proxy, http):
    old = await make_emulator(options=EmulatorOptions(version="0.3"))
    proxy = await make_proxy(old.url)
    async with http.get(f"{proxy.url}/readyz") as resp:
        ready = await resp.json()
    assert ready["ready"] and ready["api_level"] == "state-only"
    assert ready["manages_loading"] is False and "JIT" in ready["note"]
    status, body = await post(http, f"{proxy.url}/v1/chat/completions", chat(SMALL))
    assert status == 200 and old.state.load_calls[SMALL] == 1   # LM Studio's JIT loaded it
    await proxy.engine.reconcile()
    assert proxy.engine.loaded_models() == [SMALL]


async def test_a_load_by_hand_is_refused_where_the_server_cannot_load_on_request(
        make_emulator, make_proxy, http):
    """LM Studio 0.3 loads only by its JIT: POST /proxy/models/load says so and loads nothing."""
    old = await make_emulator(options=EmulatorOptions(version="0.3"))
    proxy = await make_proxy(old.url)
    async with http.post(f"{proxy.url}/proxy/models/load", json={"model": SMALL}) as resp:
        status, body = resp.status, await resp.json()
    assert status == 409 and body["error"]["code"] == "model_unavailable"
    assert body["error"]["message"] == (
        f"'{SMALL}' cannot be loaded through the proxy: LM Studio older than 0.4.0 has no "
        f"load/unload API; loading is left to its own JIT.")
    assert old.state.load_calls[SMALL] == 0


async def test_an_unload_by_hand_is_refused_where_the_server_cannot_unload_on_request(
        make_emulator, make_proxy, http):
    """LM Studio 0.3 says what it has loaded (its state is shown as it is) but has no unload
    call: the unload was answered `unloaded` while LM Studio kept the model."""
    old = await make_emulator(options=EmulatorOptions(version="0.3"))
    proxy = await make_proxy(old.url, **{"eviction.manage_external": True})
    assert (await post(http, f"{proxy.url}/v1/chat/completions", chat(SMALL)))[0] == 200
    await proxy.engine.reconcile()                   # LM Studio's JIT loaded it
    async with http.post(f"{proxy.url}/proxy/models/unload", json={"model": SMALL}) as resp:
        status, body = resp.status, await resp.json()
    assert status == 409 and body["error"]["code"] == "model_unavailable"
    assert body["error"]["message"].startswith(f"'{SMALL}' cannot be unloaded through the "
                                               f"proxy: LM Studio older than 0.4.0")
    async with http.post(f"{proxy.url}/proxy/clear", json={}) as resp:   # nothing it may unload
        assert (resp.status, await resp.json()) == (200, {"unloaded": []})
    assert [i.model.key for i in old.state.instances_of(SMALL)] == [SMALL]
    async with http.get(f"{proxy.url}/proxy/models") as resp:
        rows = {row["model"]: row for row in (await resp.json())["data"]}
    assert rows[SMALL]["state"] == "loaded" and rows[LARGE]["state"] == "unloaded"
    assert rows[SMALL]["footprint_mb"] is None      # memory is not managed here


async def test_an_lm_studio_that_does_not_say_what_is_loaded_shows_it_unknown(
        make_emulator, make_proxy, http):
    """Before 0.3.6 LM Studio lists its models on /v1/models only: the model its JIT just
    loaded for a request is not shown `unloaded`, and a load or unload by hand says why the
    proxy cannot."""
    old = await make_emulator(options=EmulatorOptions(version="0.2"))
    proxy = await make_proxy(old.url)
    assert (await post(http, f"{proxy.url}/v1/chat/completions", chat(SMALL)))[0] == 200
    assert old.state.load_calls[SMALL] == 1            # LM Studio's JIT loaded it
    await proxy.engine.reconcile()
    async with http.get(f"{proxy.url}/proxy/models") as resp:
        rows = {row["model"]: row for row in (await resp.json())["data"]}
    assert {row["state"] for row in rows.values()} == {"unknown"}
    assert rows[SMALL]["requests"] == 1 and rows[SMALL]["footprint_mb"] is None
    for path, done in (("load", "loaded"), ("unload", "unloaded")):
        async with http.post(f"{proxy.url}/proxy/models/{path}", json={"model": SMALL}) as resp:
            status, body = resp.status, await resp.json()
        assert status == 409 and body["error"]["message"] == (
            f"'{SMALL}' cannot be {done} through the proxy: LM Studio older than 0.4.0 has no "
            f"load/unload API; loading is left to its own JIT.")
    assert [i.model.key for i in old.state.instances_of(SMALL)] == [SMALL]
    async with http.get(f"{proxy.url}/readyz") as resp:
        assert (await resp.json())["api_level"] == "jit-only"
