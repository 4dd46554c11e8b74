"""A client key limited to models sees only those, on every read endpoint as on /v1/models:
recommendations drawn from its models, no other model's rows, figures, events or names in
refusals, and of the per-key counts only its own. Unlimited keys and the admin token see all."""
from __future__ import annotations

import orjson
import pytest

from proxy.emulator.catalog import CatalogModel
from proxy.engine.clock import ManualClock
from proxy.engine.memory import GB

from .sse import SseReader
from .test_progress import data_events, note
from .test_auth import ADMIN, ALICE, AUTH, BOB, CHAT, KEYS, MODEL, OTHER, bearer

EMBED = "text-embedding-nomic-embed-text-v1.5"
GEMMA_ONLY = "sk-gemma-0123456789"
SCOPED_KEYS = [*KEYS, {"name": "gemma", "key": GEMMA_ONLY, "models": [OTHER]}]
SCOPED = {**AUTH, "auth.keys": SCOPED_KEYS, "tasks.coding": [OTHER, MODEL]}


@pytest.fixture
async def scoped(make_proxy, emulator):
    return await make_proxy(emulator.url, **SCOPED)


async def get(http, url: str, secret: str) -> tuple[int, str]:
    async with http.get(url, headers=bearer(secret)) as resp:
        return resp.status, await resp.text()


async def chat(http, url: str, secret: str, model: str) -> None:
    async with http.post(f"{url}/v1/chat/completions", json={**CHAT, "model": model},
                         headers=bearer(secret)) as resp:
        assert resp.status == 200, await resp.text()


async def recommend(http, url: str, secret: str, task: str) -> dict:
    async with http.get(f"{url}/proxy/recommendations",
                        params={"task_type": task, "complexity": "0.9"},
                        headers=bearer(secret)) as resp:
        assert resp.status == 200
        return await resp.json()


async def test_recommendations_come_from_the_models_the_key_may_use(make_proxy, emulator,
                                                                   http):
    clock = ManualClock()
    scoped = await make_proxy(emulator.url, app_kwargs={"clock": clock}, **SCOPED)
    async with http.post(f"{scoped.url}/proxy/models/load", json={"model": OTHER},
                         headers=bearer(ADMIN)) as resp:
        assert resp.status == 200
    clock.advance(3600)           # loaded, idle, not asked for in an hour: one to unload
    everyone = await recommend(http, scoped.url, ALICE, "coding")
    assert everyone["recommended_models"][0] == OTHER and MODEL in everyone[
        "recommended_models"]
    fast = await recommend(http, scoped.url, BOB, "coding")
    assert fast["recommended_models"] == [MODEL] and list(fast["reasoning"]) == [MODEL]
    assert fast["models_to_unload"] == [] and "note" not in fast
    gemma = await recommend(http, scoped.url, GEMMA_ONLY, "chat")
    assert gemma["recommended_models"] == [OTHER]
    embedding = await recommend(http, scoped.url, BOB, "embedding")
    assert embedding["recommended_models"] == [] and embedding["models_to_preload"] == []
    assert embedding["note"] == ("This API key ('bob') may use no embedding model for the "
                                 "task 'embedding'.")
    assert embedding["models_to_unload"] == []
    everyone = await recommend(http, scoped.url, ALICE, "embedding")
    assert everyone["recommended_models"][0] == EMBED and everyone["models_to_unload"] == [OTHER]


async def test_a_limited_key_is_recommended_its_model_however_low_it_ranks(make_emulator,
                                                                          make_proxy, http):
    """Seven models, six configured for the task ahead of the key's one: the key's model is
    ranked among its own, not cut off with the five best of everyone's."""
    lab = [f"lab/m{i}" for i in range(1, 8)]
    emu = await make_emulator(catalog=[CatalogModel(key=k, size_bytes=GB, load_time_s=0.0)
                                       for k in lab])
    proxy = await make_proxy(emu.url, **{"auth.keys": [
        {"name": "seventh", "key": GEMMA_ONLY, "models": [lab[6]]}], "tasks.coding": lab[:6]})
    rec = await recommend(http, proxy.url, GEMMA_ONLY, "coding")
    assert rec["recommended_models"] == [lab[6]] and "note" not in rec


async def test_the_read_endpoints_show_a_limited_key_only_its_models(scoped, http):
    await chat(http, scoped.url, ALICE, OTHER)
    await chat(http, scoped.url, BOB, "fast")
    base = scoped.url
    async with http.get(f"{base}/proxy/models", headers=bearer(BOB)) as resp:
        assert [r["model"] for r in (await resp.json())["data"]] == [MODEL]
    for path in ("/proxy/models", "/proxy/stats", "/proxy/health", "/proxy/timeline"):
        status, text = await get(http, base + path, BOB)
        assert status == 200
        assert OTHER not in text and EMBED not in text, path
        assert "alice" not in text and "gemma" not in text, path
        status, full = await get(http, base + path, ALICE)
        assert status == 200 and OTHER in full, path
    async with http.get(f"{base}/proxy/stats", headers=bearer(BOB)) as resp:
        stats = await resp.json()
    assert list(stats["models"]) == [MODEL] and stats["loaded_models"] == [MODEL]
    assert [t["model"] for t in stats["top_models_by_usage"]] == [MODEL]
    assert list(stats["auth"]["requests_by_key"]) == ["bob"]
    assert sum(stats["model_counts"].values()) == 1 and stats["model_counts"]["loaded"] == 1
    for secret, names in ((ALICE, {"alice", "bob"}), (ADMIN, {"alice", "bob", "admin"})):
        async with http.get(f"{base}/proxy/stats", headers=bearer(secret)) as resp:
            everything = await resp.json()
        assert names <= set(everything["auth"]["requests_by_key"])
        assert {MODEL, OTHER, EMBED} <= set(everything["models"])


async def test_a_reason_naming_another_model_names_it_as_another_model(make_emulator,
                                                                       make_proxy, http):
    """The coder is preloaded because it follows the planner: a key limited to the coder sees
    the preload, not the planner's name."""
    planner, coder = "lab/planner", "lab/coder"
    emu = await make_emulator(catalog=[CatalogModel(key=k, size_bytes=GB, load_time_s=0.0)
                                       for k in (planner, coder)])
    clock = ManualClock()
    proxy = await make_proxy(emu.url, app_kwargs={"clock": clock}, **{"auth.keys": [
        {"name": "coder", "key": GEMMA_ONLY, "models": [coder]}]})
    core = proxy.engine
    for _ in range(5):              # the planner, then the coder four seconds later
        (await core.acquire(planner)).release()
        clock.advance(4)
        (await core.acquire(coder)).release()
        clock.advance(600)
    await core.clear()
    (await core.acquire(planner)).release()
    await core.scheduler.settled()
    await core.entry(coder).load_task
    status, text = await get(http, f"{proxy.url}/proxy/timeline", GEMMA_ONLY)
    lanes = orjson.loads(text)["models"]
    assert status == 200 and list(lanes) == [coder] and planner not in text
    assert [reason for _, reason in lanes[coder]["preloads"]] == ["follows another model"]


async def test_a_limited_keys_event_stream_leaves_other_models_out(scoped, http):
    await chat(http, scoped.url, ALICE, OTHER)
    async with http.get(f"{scoped.url}/proxy/events", headers=bearer(BOB)) as resp:
        events = SseReader(resp)
        snapshot = await events.next()
        assert snapshot.type == "snapshot"
        assert [m["model"] for m in snapshot.data["models"]] == [MODEL]
        await chat(http, scoped.url, ADMIN, EMBED)   # events about EMBED, then about MODEL
        await chat(http, scoped.url, BOB, MODEL)
        seen = await events.until(lambda e: e.type == "state" and e.data["model"] == MODEL
                                  and e.data["new"] == "loaded")
    assert all(EMBED not in repr(e.data) and OTHER not in repr(e.data) for e in seen)


async def test_refusals_to_a_limited_key_name_no_other_model(make_proxy, emulator, http):
    keys = [*KEYS, {"name": "typo", "key": GEMMA_ONLY, "models": ["qwen/qwen3-4c"]}]
    proxy = await make_proxy(emulator.url, **{**AUTH, "auth.keys": keys, "groups": [
        {"name": "big", "members": [MODEL, OTHER], "policy": "exclusive"}]})
    async with http.post(f"{proxy.url}/proxy/models/load", json={"model": OTHER},
                         headers=bearer(ADMIN)) as resp:
        assert resp.status == 200
    async with http.post(f"{proxy.url}/proxy/models/pin", json={"model": OTHER, "pinned": True},
                         headers=bearer(ADMIN)) as resp:
        assert resp.status == 200
    messages = {}
    for secret in (BOB, ALICE):
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                             headers=bearer(secret)) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 503 and error["code"] == "group_busy"
            messages[secret] = error["message"]
    assert f"'{OTHER}'" in messages[ALICE] and OTHER not in messages[BOB]
    assert messages[BOB] == messages[ALICE].replace(f"'{OTHER}'", "another model")
    # A name the key may use but no model has: the suggestion is not another key's model.
    for secret in (GEMMA_ONLY, ALICE):
        async with http.post(f"{proxy.url}/v1/chat/completions",
                             json={**CHAT, "model": "qwen/qwen3-4c"},
                             headers=bearer(secret)) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 404 and error["code"] == "model_not_found"
            messages[secret] = error["message"]
    assert f"Did you mean: '{MODEL}'" in messages[ALICE]
    assert messages[GEMMA_ONLY] == "The model 'qwen/qwen3-4c' does not exist."


async def test_a_refusal_in_a_started_stream_names_no_other_model(make_proxy, emulator, http):
    """Refused after the loading notes began: the error event, too, leaves the holder out."""
    large = "openai/gpt-oss-20b"
    proxy = await make_proxy(emulator.url, **{
        **SCOPED, "server.loading_progress_interval_s": 0.1, "memory.budget_gb": 20,
        "eviction.queue_timeout_s": 0.5})
    serving = await proxy.engine.acquire(large)     # in use: it cannot make room yet
    try:
        events = {}
        for secret in (GEMMA_ONLY, ALICE):
            async with http.post(f"{proxy.url}/v1/chat/completions", headers=bearer(secret),
                                 json={**CHAT, "model": OTHER, "stream": True}) as resp:
                await note(resp)
                (events[secret],) = data_events(await resp.read())
    finally:
        serving.release()
    assert events[ALICE]["error"]["code"] == "insufficient_memory"
    assert f"'{large}'" in events[ALICE]["error"]["message"]
    assert events[GEMMA_ONLY]["error"]["message"] == \
        events[ALICE]["error"]["message"].replace(f"'{large}'", "another model")


async def test_metrics_show_a_limited_key_its_own_request_count_only(make_proxy, emulator,
                                                                     http):
    proxy = await make_proxy(emulator.url, **{**AUTH, "auth.metrics_access": "key"})
    await chat(http, proxy.url, ALICE, MODEL)
    await chat(http, proxy.url, BOB, MODEL)
    _, limited = await get(http, f"{proxy.url}/metrics", BOB)
    _, full = await get(http, f"{proxy.url}/metrics", ALICE)
    assert 'proxy_requests_by_key_total{key="bob"}' in limited and "alice" not in limited
    assert 'proxy_requests_by_key_total{key="alice"}' in full
    assert 'proxy_requests_by_key_total{key="bob"}' in full


async def test_a_limited_key_hears_no_event_about_another_model_not_even_an_alert(
        make_proxy, emulator, http):
    """An event about a model the key may not use is left out whole, not sent with its name
    blanked: an error_rate alert about it (whose id also names it) and its state changes."""
    proxy = await make_proxy(emulator.url, **{**SCOPED, "health.min_requests": 1})
    async with http.get(f"{proxy.url}/proxy/events", headers=bearer(BOB)) as resp:
        events = SseReader(resp)
        assert (await events.next()).type == "snapshot"
        emulator.state.faults.inference_status = 500
        async with http.post(f"{proxy.url}/v1/chat/completions", headers=bearer(ALICE),
                             json={**CHAT, "model": OTHER}) as failed:
            assert failed.status == 500
        emulator.state.faults.inference_status = None
        status, health = await get(http, f"{proxy.url}/proxy/health", ADMIN)  # opens the alert
        assert status == 200 and f"error_rate:{OTHER}" in health
        await chat(http, proxy.url, BOB, MODEL)
        seen = await events.until(lambda e: e.type == "state" and e.data["model"] == MODEL
                                  and e.data["new"] == "loaded")
    assert [e for e in seen if e.type == "alert"] == []
    assert {e.data["model"] for e in seen if "model" in e.data} == {MODEL}
    assert all(OTHER not in repr(e.data) for e in seen)


async def test_a_did_you_mean_names_no_alias_of_another_model(make_proxy, emulator, http):
    """The suggestions include aliases: another model's alias is left out of a limited key's
    hint, an alias of the key's own model kept."""
    own = "sk-own-0123456789"
    keys = [*KEYS, {"name": "typo", "key": GEMMA_ONLY, "models": ["fasd"]},
            {"name": "own", "key": own, "models": ["fasd", MODEL]}]
    proxy = await make_proxy(emulator.url, **{**AUTH, "auth.keys": keys})
    messages = {}
    for secret in (GEMMA_ONLY, ALICE, own):
        async with http.post(f"{proxy.url}/v1/chat/completions", headers=bearer(secret),
                             json={**CHAT, "model": "fasd"}) as resp:
            messages[secret] = (resp.status, (await resp.json())["error"]["message"])
    assert messages[ALICE][0] == 404 and "Did you mean: 'fast'" in messages[ALICE][1]
    assert messages[own][0] == 404 and "Did you mean: 'fast'" in messages[own][1]
    assert messages[GEMMA_ONLY] == (404, "The model 'fasd' does not exist.")


async def test_a_key_whose_model_cannot_load_here_is_told_why_not_that_it_has_none(
        make_proxy, emulator, http):
    """Its one model is too large for this machine: the answer lists it under not_loadable,
    with no note saying the key may use no model for the task."""
    large = "openai/gpt-oss-20b"
    proxy = await make_proxy(emulator.url, **{
        "auth.keys": [{"name": "large", "key": GEMMA_ONLY, "models": [large]}],
        "memory.budget_gb": 10})
    rec = await recommend(http, proxy.url, GEMMA_ONLY, "chat")
    assert rec["recommended_models"] == [] and list(rec["not_loadable"]) == [large]
    assert "note" not in rec
