"""Admin calls that name one host of a fleet: they answer for the host they acted on, refuse a
host that may not hold the model, and refuse a query and a body that name different hosts; a
host's refusal names its own keys."""
from __future__ import annotations

from typing import Any

import pytest

from proxy.configload import load_config
from proxy.emulator.catalog import CatalogModel
from .fakes import GB

pytestmark = pytest.mark.timeout(60)

SMALL, MID, HUGE = "lab/small-2b", "lab/mid-6b", "lab/huge-70b"
CATALOG = [CatalogModel(key=SMALL, size_bytes=2 * GB, memory_bytes=2 * GB, load_time_s=0.0),
           CatalogModel(key=MID, size_bytes=5 * GB, memory_bytes=5 * GB, load_time_s=0.0),
           CatalogModel(key=HUGE, size_bytes=50 * GB, memory_bytes=50 * GB, load_time_s=0.0)]


@pytest.fixture
async def fleet(make_emulator, make_proxy) -> Any:
    """Hosts a and b (any model) and c (lab/small-* only), 20 GB each."""
    emus = {n: await make_emulator(catalog=CATALOG) for n in "abc"}
    hosts = [{"name": n, "url": emus[n].url, "budget_gb": 20} for n in "abc"]
    hosts[2]["models"] = ["lab/small-*"]
    proxy = await make_proxy("", config=load_config({
        "upstreams": hosts, "storage": {"enabled": False}, "eviction": {"hold": 0},
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100}}))
    return proxy, emus


async def post(http: Any, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict]:
    async with http.post(url, json=body) as r:
        return r.status, await r.json()


async def test_load_and_unload_answer_for_the_host_they_acted_on(fleet, http):
    proxy, emus = fleet
    await proxy.engine.load(SMALL, host="a")
    status, body = await post(http, f"{proxy.url}/proxy/models/load",
                              {"model": SMALL, "host": "b"})
    assert status == 200 and (body["host"], body["state"]) == ("b", "loaded")
    assert body["hosts"] == {"a": "loaded", "b": "loaded", "c": "unloaded"}
    status, body = await post(http, f"{proxy.url}/proxy/models/unload",
                              {"model": SMALL, "host": "b"})
    assert status == 200 and (body["host"], body["state"]) == ("b", "unloaded")
    assert emus["a"].state.instances_of(SMALL) and not emus["b"].state.instances_of(SMALL)
    status, body = await post(http, f"{proxy.url}/proxy/models/load", {"model": MID})
    assert status == 200 and body["hosts"][body["host"]] == "loaded"   # where it was placed


async def test_a_pin_on_a_host_that_may_not_hold_the_model_is_a_404(fleet, http):
    proxy, _ = fleet
    status, body = await post(http, f"{proxy.url}/proxy/models/pin",
                              {"model": MID, "host": "c"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert body["error"]["message"] == f"Host 'c' may not hold '{MID}' (its models: lab/small-*)"
    assert not proxy.engine.pinned(MID)
    status, body = await post(http, f"{proxy.url}/proxy/models/pin",
                              {"model": SMALL, "host": "c"})
    assert status == 200 and body["pinned"] is True


async def test_a_pin_answers_for_the_host_it_named_and_lists_where_the_model_is_pinned(fleet,
                                                                                     http):
    proxy, _ = fleet
    await proxy.engine.load(SMALL, host="a")
    status, body = await post(http, f"{proxy.url}/proxy/models/pin", {"model": SMALL, "host": "b"})
    assert status == 200
    assert (body["host"], body["state"], body["pinned"]) == ("b", "unloaded", True)
    assert body["pinned_on"] == ["b"] and body["hosts"]["a"] == "loaded"
    status, body = await post(http, f"{proxy.url}/proxy/models/pin",
                              {"model": SMALL, "host": "a", "pinned": False})
    assert (body["host"], body["pinned"], body["pinned_on"]) == ("a", False, ["b"])
    status, body = await post(http, f"{proxy.url}/proxy/models/pin", {"model": SMALL})
    assert (body["pinned"], body["pinned_on"]) == (True, ["a", "b", "c"])


async def test_a_query_and_a_body_naming_different_hosts_is_a_400(fleet, http):
    proxy, emus = fleet
    await proxy.engine.load(SMALL, host="b")
    for path in ("clear", "optimize", "models/unload", "models/load", "models/pin"):
        status, body = await post(http, f"{proxy.url}/proxy/{path}?host=a",
                                  {"model": SMALL, "host": "b"})
        assert status == 400 and body["error"]["param"] == "host", path
        assert "'a'" in body["error"]["message"] and "'b'" in body["error"]["message"]
    assert emus["b"].state.instances_of(SMALL) and not emus["a"].state.instances_of(SMALL)
    status, body = await post(http, f"{proxy.url}/proxy/clear?host=b", {"host": "b"})
    assert status == 200 and body["unloaded"] == [SMALL]


async def test_a_hosts_too_large_refusal_names_that_hosts_budget(fleet, http):
    proxy, _ = fleet
    status, body = await post(http, f"{proxy.url}/proxy/models/load",
                              {"model": HUGE, "host": "b"})
    assert status == 503 and body["error"]["code"] == "model_too_large"
    message = body["error"]["message"]
    assert "or upstreams[1].budget_gb," in message and "memory.budget_gb" not in message
