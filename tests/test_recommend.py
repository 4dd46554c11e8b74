"""Recommendations follow config and learned success; `auto:<task>` routes and says where."""
from __future__ import annotations

import pytest

from proxy.engine.recommend import ModelFacts, recommend

GB = 1_000_000_000
SMALL, LARGE, CODER = "qwen/qwen3-4b", "google/gemma-3-12b", "openai/gpt-oss-20b"


def facts(key, gb, *, loaded=False, reload_s=None, **kw):
    return ModelFacts(key=key, type="llm", loaded=loaded, idle=loaded,
                      footprint_bytes=gb * GB,
                      reload_s=gb / 1.5 + 1.5 if reload_s is None else reload_s, priority=5,
                      success_rate=1.0, requests=0, **kw)


def top(result):
    return result["recommended_models"][0]


def test_config_names_the_models_of_a_task_in_order():
    pool = [facts(SMALL, 3), facts(LARGE, 9), facts(CODER, 14)]
    tasks = {"coding": (CODER, SMALL)}
    result = recommend(pool, {"task_type": "coding"}, headroom_bytes=32 * GB, tasks=tasks)
    assert result["recommended_models"][:2] == [CODER, SMALL]
    assert "configured for coding" in result["reasoning"][CODER]["why"]


def test_learned_success_outranks_a_model_that_failed_the_task():
    pool = [facts(SMALL, 3, task_requests=20, task_success_rate=0.3),
            facts(LARGE, 9, task_requests=20, task_success_rate=1.0, task_latency_s=2.0)]
    result = recommend(pool, {"task_type": "summarize"}, headroom_bytes=32 * GB, tasks={})
    assert top(result) == LARGE


def test_urgency_favours_a_loaded_model_and_complexity_a_larger_one():
    pool = [facts(SMALL, 3, loaded=True), facts(LARGE, 12)]
    ctx = {"task_type": "chat"}
    assert top(recommend(pool, {**ctx, "urgency": 1.0, "complexity": 0.5},
                         headroom_bytes=32 * GB, tasks={})) == SMALL
    assert top(recommend(pool, {**ctx, "urgency": 0.0, "complexity": 1.0},
                         headroom_bytes=32 * GB, tasks={})) == LARGE


def test_urgency_alone_can_prefer_the_loaded_model_over_the_configured_one():
    pool = [facts(SMALL, 6, loaded=True, reload_s=0.1), facts(LARGE, 6, reload_s=0.1)]
    tasks = {"chat": (LARGE, SMALL)}
    assert top(recommend(pool, {"task_type": "chat", "urgency": 0.0}, headroom_bytes=32 * GB,
                         tasks=tasks)) == LARGE
    assert top(recommend(pool, {"task_type": "chat", "urgency": 1.0}, headroom_bytes=32 * GB,
                         tasks=tasks)) == SMALL


def test_only_the_models_named_in_the_context_are_candidates():
    pool = [facts(SMALL, 3), facts(LARGE, 9, loaded=True), facts(CODER, 14)]
    result = recommend(pool, {"task_type": "chat", "urgency": 1.0, "models": [SMALL, "fast"]},
                       headroom_bytes=32 * GB, tasks={"chat": (LARGE,)})
    assert result["recommended_models"] == [SMALL]
    assert recommend(pool, {"models": []}, headroom_bytes=32 * GB,
                     tasks={})["recommended_models"] == []


async def test_failures_on_a_task_teach_the_engine_to_prefer_another(emulator, private_home):
    from proxy.library import ModelMemoryManager
    from proxy.engine.usage import RequestRecord
    mgr = ModelMemoryManager(min_free_memory_gb=0, upstream=emulator.url)
    await mgr.start()
    for model, ok in ((SMALL, False), (LARGE, True)):
        for _ in range(10):
            mgr.record(RequestRecord(model=model, ok=ok, latency_s=1.0, at_s=mgr.clock.now(),
                                     task="translate"))
    for _ in range(90):                  # SMALL does well at everything else
        mgr.record(RequestRecord(model=SMALL, ok=True, latency_s=1.0, at_s=mgr.clock.now()))
    ranked = mgr.get_model_recommendations({"task_type": "translate", "urgency": 0,
                                            "complexity": 0})["recommended_models"]
    assert ranked.index(LARGE) < ranked.index(SMALL)
    await mgr.cleanup()


def test_free_memory_decides_what_is_possible():
    pool = [facts(SMALL, 3), facts(LARGE, 12)]
    ctx = {"task_type": "chat", "urgency": 0.3, "complexity": 0.9}
    assert top(recommend(pool, ctx, headroom_bytes=32 * GB, tasks={})) == LARGE
    tight = recommend(pool, {**ctx, "available_memory_gb": 4}, headroom_bytes=32 * GB, tasks={})
    assert top(tight) == SMALL and tight["models_to_preload"] == [SMALL]


def test_idle_models_nobody_will_want_soon_are_offered_for_unloading():
    pool = [facts(SMALL, 3, loaded=True, p_reuse=0.9), facts(LARGE, 9, loaded=True, p_reuse=0.05),
            ModelFacts(key="text-embedding-x", type="embedding", loaded=True, idle=True,
                       footprint_bytes=GB / 10, reload_s=1.0, priority=5, success_rate=1.0,
                       requests=0, p_reuse=0.01)]
    result = recommend(pool, {"task_type": "chat", "urgency": 1.0, "complexity": 0.0},
                       headroom_bytes=0.0,
                       tasks={}, limit=1)
    assert result["recommended_models"] == [SMALL]
    assert result["models_to_unload"] == ["text-embedding-x", LARGE]


async def test_tagged_requests_teach_and_auto_routes(emulator, make_proxy, http):
    proxy = await make_proxy(emulator.url)
    for model, ok_model in ((SMALL, True), (LARGE, True)):
        for _ in range(3):
            async with http.post(f"{proxy.url}/v1/chat/completions", headers={
                    "X-Task-Type": "Summarize"}, json={
                    "model": model, "max_tokens": 2, "messages": []}) as r:
                assert r.status == 200
    assert proxy.engine.usage(SMALL).tasks["summarize"][0] == 3
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": "auto:summarize", "max_tokens": 2, "messages": [],
            "metadata": {"urgency": "1", "complexity": "1"}}) as r:
        body = await r.json()
        routed = r.headers["X-Proxy-Model"]
    assert r.status == 200 and routed in (SMALL, LARGE) and body["model"] == routed
    assert proxy.engine.usage(routed).tasks["summarize"][0] == 4
    async with http.get(f"{proxy.url}/proxy/recommendations",
                        params={"task_type": "summarize", "urgency": "0.5"}) as r:
        recs = await r.json()
    assert set(recs["recommended_models"][:2]) == {SMALL, LARGE}


async def test_auto_with_a_configured_task(emulator, make_proxy, http):
    proxy = await make_proxy(emulator.url, **{"tasks.coding": [LARGE]})
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": "auto:coding", "max_tokens": 2, "messages": []}) as r:
        assert r.status == 200 and r.headers["X-Proxy-Model"] == LARGE
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": "auto:Bad Task!", "messages": []}) as r:
        body = await r.json()
    assert r.status == 400 and body["error"]["param"] == "model"
    async with http.get(f"{proxy.url}/proxy/recommendations",
                        params={"urgency": "very"}) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "urgency"


@pytest.mark.parametrize("context", ["coding", {"task": "code"}, None])
def test_context_forms(context):
    result = recommend([facts(SMALL, 3)], context, headroom_bytes=GB * 8, tasks={})
    assert result["recommended_models"] == [SMALL]


def test_a_model_that_can_never_load_is_never_recommended():
    pool = [facts(SMALL, 3), facts(CODER, 14), facts(LARGE, 9, load_error="out of memory")]
    result = recommend(pool, {"task_type": "reasoning", "complexity": 1.0},
                       headroom_bytes=4 * GB, ceiling_bytes=12 * GB, tasks={})
    assert result["recommended_models"] == [SMALL]
    assert "more than the 12.0 GB any one model may take" in result["not_loadable"][CODER]
    assert "out of memory" in result["not_loadable"][LARGE]
    loaded = recommend([facts(CODER, 14, loaded=True)], "chat", headroom_bytes=0,
                       ceiling_bytes=12 * GB, tasks={})
    assert loaded["recommended_models"] == [CODER]      # already in memory: it can serve


def demo_config(upstream_url):
    from proxy.cli import build_parser, resolve_config
    from proxy.configload import replace_config
    config = resolve_config(build_parser().parse_args(["--demo"]), {})
    return replace_config(config, {"upstream.url": upstream_url, "storage.enabled": False})


async def test_the_demo_never_recommends_or_routes_to_a_model_too_large(emulator, make_proxy,
                                                                        http):
    proxy = await make_proxy(emulator.url, config=demo_config(emulator.url))
    query = {"task_type": "reasoning", "complexity": "1", "urgency": "0"}
    async with http.get(f"{proxy.url}/proxy/recommendations", params=query) as r:
        recs = await r.json()
    assert CODER not in recs["recommended_models"] and recs["recommended_models"]
    assert "any one model may take" in recs["not_loadable"][CODER]
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": "auto:reasoning", "max_tokens": 2, "messages": [],
            "metadata": {"complexity": 1, "urgency": 0}}) as r:
        assert r.status == 200 and r.headers["X-Proxy-Model"] != CODER


async def test_auto_refuses_when_every_candidate_is_too_large(make_emulator, make_proxy, http):
    from proxy.emulator import CatalogModel
    emu = await make_emulator(catalog=[CatalogModel(key=LARGE, size_bytes=20 * GB,
                                                    memory_bytes=20 * GB, load_time_s=0.0)])
    proxy = await make_proxy(emu.url, **{"memory.budget_gb": 16})
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": "auto", "messages": []}) as r:
        body = await r.json()
    assert r.status == 503 and body["error"]["code"] == "model_too_large"
    assert body["error"]["message"].startswith("No LLM for the task 'chat' can be loaded here")
    assert LARGE in body["error"]["message"] and emu.state.load_calls[LARGE] == 0


EMBED = "text-embedding-nomic-embed-text-v1.5"


async def test_auto_picks_only_models_the_endpoint_can_use(emulator, make_proxy, http):
    proxy = await make_proxy(emulator.url)
    for model in ("auto", "auto:embedding", "auto:search"):
        async with http.post(f"{proxy.url}/v1/embeddings",
                             json={"model": model, "input": "hello"}) as r:
            assert r.status == 200 and r.headers["X-Proxy-Model"] == EMBED, model
    for path, body in (("/v1/chat/completions", {"messages": []}),
                       ("/v1/completions", {"prompt": "hi"}), ("/v1/responses", {"input": "hi"})):
        async with http.post(f"{proxy.url}{path}",
                             json={"model": "auto", "max_tokens": 2, **body}) as r:
            assert r.status == 200 and r.headers["X-Proxy-Model"] != EMBED, path


@pytest.mark.parametrize("path, model, body, tasks", [
    ("/v1/chat/completions", "auto:embedding", {"messages": []}, {}),
    ("/v1/chat/completions", "auto:embed", {"messages": []}, {}),
    ("/v1/embeddings", "auto:chat", {"input": "hi"}, {}),
    ("/v1/embeddings", "auto:coding", {"input": "hi"}, {}),
    ("/v1/chat/completions", "auto:search", {"messages": []}, {"tasks.search": [EMBED]}),
])
async def test_auto_for_a_task_of_the_other_kind_is_a_400(emulator, make_proxy, http, path,
                                                          model, body, tasks):
    proxy = await make_proxy(emulator.url, **tasks)
    async with http.post(f"{proxy.url}{path}", json={"model": model, **body}) as r:
        error = (await r.json())["error"]
    assert r.status == 400 and error["param"] == "model"
    assert error["type"] == "invalid_request_error" and path in error["message"]
    assert sum(emulator.state.load_calls.values()) == 0


def test_a_single_name_given_as_models_limits_nothing():
    """`models` is a list of keys; a bare string (one name, or a typo) is not read as the set
    of its characters, which would leave no candidate at all."""
    pool = [facts(SMALL, 3), facts(LARGE, 9, loaded=True)]
    result = recommend(pool, {"task_type": "chat", "urgency": 1.0, "models": SMALL},
                       headroom_bytes=32 * GB, tasks={"chat": (LARGE,)})
    assert result["recommended_models"] and set(result["recommended_models"]) == {SMALL, LARGE}


async def test_the_http_api_takes_the_model_type_as_the_library_does(emulator, make_proxy,
                                                                     http):
    proxy = await make_proxy(emulator.url)
    embedders = {k for k, e in proxy.engine.registry.entries.items() if e.type == "embedding"}
    assert embedders      # the emulator's catalogue has one
    async with http.get(f"{proxy.url}/proxy/recommendations",
                        params={"model_type": "embedding"}) as r:
        recs = await r.json()
    assert r.status == 200 and recs["model_type"] == "embedding"
    assert recs["recommended_models"] and set(recs["recommended_models"]) <= embedders
    async with http.get(f"{proxy.url}/proxy/recommendations",
                        params={"model_type": "image"}) as r:
        body = await r.json()
    assert r.status == 400 and body["error"]["param"] == "model_type"
