"""The library's arguments are checked as the HTTP API checks the same values: one rule, the
same error (proxy.errors) with the same words, before anything is loaded or recorded."""
from __future__ import annotations

import math

import pytest

from proxy import ModelMemoryManager
from proxy.errors import InvalidRequest, ModelNotFound, ProxyError

pytestmark = pytest.mark.timeout(60)
MODEL = "qwen/qwen3-4b"


@pytest.fixture
async def manager(emulator, private_home):
    async with ModelMemoryManager(min_free_memory_gb=1, upstream=emulator.url) as m:
        yield m


def as_http(exc: ProxyError) -> tuple[int, dict]:
    return exc.status, exc.body()


async def http_error(http, method, url, **kwargs) -> tuple[int, dict]:
    async with http.request(method, url, **kwargs) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("priority", ["5", 5.5, True, 0, 11])
async def test_a_priority_is_refused_as_the_admin_api_refuses_it(manager, proxy, http,
                                                                   emulator, priority):
    with pytest.raises(InvalidRequest) as lib:
        await manager.load_model(MODEL, priority=priority)
    assert as_http(lib.value) == await http_error(
        http, "POST", f"{proxy.url}/proxy/models/load",
        json={"model": MODEL, "priority": priority})
    assert lib.value.param == "priority" and emulator.state.load_calls[MODEL] == 0


async def test_a_name_that_is_not_a_string_is_refused_as_the_admin_api_refuses_it(
        manager, proxy, http):
    with pytest.raises(InvalidRequest) as lib:
        await manager.load_model(None)      # type: ignore[arg-type]
    assert as_http(lib.value) == await http_error(
        http, "POST", f"{proxy.url}/proxy/models/load", json={"model": None})
    with pytest.raises(InvalidRequest, match="'model' is required"):
        await manager.ensure_models_available([MODEL, None])    # type: ignore[list-item]
    assert MODEL not in manager.get_loaded_models()             # checked before any load


async def test_a_pin_is_checked_as_the_admin_api_checks_it(manager, proxy, http):
    with pytest.raises(InvalidRequest) as lib:
        manager.set_pinned(MODEL, "yes")                        # type: ignore[arg-type]
    assert as_http(lib.value) == await http_error(
        http, "POST", f"{proxy.url}/proxy/models/pin", json={"model": MODEL, "pinned": "yes"})
    with pytest.raises(ModelNotFound) as lib:
        manager.set_pinned("qwen/qwen3-4", True)
    assert as_http(lib.value) == await http_error(
        http, "POST", f"{proxy.url}/proxy/models/pin", json={"model": "qwen/qwen3-4"})
    assert "Did you mean: 'qwen/qwen3-4b'" in lib.value.message
    assert not manager.is_pinned("qwen/qwen3-4") and not manager.is_pinned(MODEL)


@pytest.mark.parametrize("urgency", ["very", math.nan, math.inf])
async def test_a_recommendation_context_is_checked_as_the_admin_api_checks_it(
        manager, proxy, http, urgency):
    with pytest.raises(InvalidRequest) as lib:
        manager.get_model_recommendations({"urgency": urgency})
    assert as_http(lib.value) == await http_error(
        http, "GET", f"{proxy.url}/proxy/recommendations", params={"urgency": str(urgency)})
    assert lib.value.param == "urgency"


@pytest.mark.parametrize("context,param", [
    (["chat"], "context"), ({"model_type": "banana"}, "model_type"),
    ({"complexity": True}, "complexity"), ({"task_type": 7}, "task_type"),
    ({"available_memory_gb": -1}, "available_memory_gb")])
def test_a_wrong_recommendation_context_is_named_not_ignored(manager, context, param):
    with pytest.raises(InvalidRequest) as exc:
        manager.get_model_recommendations(context)
    assert exc.value.param == param


def test_a_weight_outside_0_to_1_is_clamped_as_over_http(manager):
    assert manager.get_model_recommendations({"urgency": 5})["urgency"] == 1.0


@pytest.mark.parametrize("model,kwargs,error,param", [
    ("no/such", {"latency": 1.0}, ModelNotFound, "model"),
    (MODEL, {"latency": -5}, InvalidRequest, "latency"),
    (MODEL, {"latency": math.nan}, InvalidRequest, "latency"),
    (MODEL, {"latency": "1"}, InvalidRequest, "latency"),
    (MODEL, {"latency": 1.0, "tokens_used": -10}, InvalidRequest, "tokens_used"),
    (MODEL, {"latency": 1.0, "tokens_used": 2.5}, InvalidRequest, "tokens_used"),
    (MODEL, {"latency": 1.0, "success": "yes"}, InvalidRequest, "success")])
async def test_a_usage_record_that_cannot_be_true_is_refused(manager, model, kwargs, error, param):
    with pytest.raises(error) as exc:
        manager.record_model_usage(model, **kwargs)
    assert exc.value.param == param
    usage = manager.usage(MODEL)
    assert (usage.requests, usage.completion_tokens) == (0, 0)


async def test_one_name_given_as_a_string_is_one_model(manager):
    assert await manager.ensure_models_available(MODEL) == {MODEL: True}
