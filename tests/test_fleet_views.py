"""A fleet is visible everywhere: `/metrics` labels its series with the host (configured names
only) and has per-host gauges, the event stream says on which host things happen and shows each
host's memory, `/proxy/health` and `/readyz` have each host's state. A single server's views
have no host in them."""
from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.engine.memory import GB
from proxy.server.keys import EVENTS

from .sse import SseReader
from .test_fleet import CATALOG, MID, SMALL, chat, fleet_config

pytestmark = pytest.mark.timeout(60)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
async def two(make_emulator, make_proxy) -> tuple[Any, dict[str, Any]]:
    """Hosts `a` (12 GB) and `b` (20 GB)."""
    emus = {n: await make_emulator(catalog=CATALOG) for n in ("a", "b")}
    proxy = await make_proxy("", config=fleet_config(
        [("a", emus["a"].url, 12), ("b", emus["b"].url, 20)]))
    return proxy, emus


async def take_down(proxy: Any, emus: dict[str, Any], name: str) -> None:
    """The host's server goes away and its engine notices (as its reconcile loop would)."""
    await emus[name].close()
    host = proxy.engine.by_name[name]
    await host.core.reconcile()
    assert not host.up


async def metrics(http: Any, proxy: Any) -> dict[tuple[str, tuple], float]:
    async with http.get(f"{proxy.url}/metrics") as r:
        assert r.status == 200
        return samples(await r.text())


async def test_metrics_label_each_series_with_its_host_and_have_per_host_gauges(two, http):
    proxy, _ = two
    await proxy.engine.load(SMALL, host="a")
    status, _, headers = await chat(http, proxy, SMALL)
    assert status == 200 and headers["X-Proxy-Host"] == "a"
    assert (await chat(http, proxy, "lab/no-such-model"))[0] == 404
    m = await metrics(http, proxy)
    ep = "/v1/chat/completions"
    assert m[("proxy_requests_total", (("endpoint", ep), ("host", "a"), ("model", SMALL),
                                       ("outcome", "success")))] == 1
    assert m[("proxy_request_duration_seconds_count", (("host", "a"), ("model", SMALL)))] == 1
    assert m[("proxy_tokens_total", (("host", "a"), ("kind", "completion"),
                                     ("model", SMALL)))] == 4
    assert m[("proxy_model_loads_total", (("host", "a"), ("model", SMALL),
                                          ("outcome", "success")))] == 1
    assert m[("proxy_model_loaded", (("host", "a"), ("model", SMALL)))] == 1
    assert m[("proxy_model_loaded", (("host", "b"), ("model", SMALL)))] == 0
    assert m[("proxy_host_up", (("host", "a"),))] == 1 == m[("proxy_host_up", (("host", "b"),))]
    assert m[("proxy_host_memory_total_bytes", (("host", "b"),))] == 20 * GB
    assert m[("proxy_host_memory_used_bytes", (("host", "a"),))] == pytest.approx(2.4 * GB)
    assert m[("proxy_host_memory_ceiling_bytes", (("host", "b"),))] == 20 * GB
    assert m[("proxy_host_loaded_models", (("host", "a"),))] == 1
    assert m[("proxy_host_loaded_models", (("host", "b"),))] == 0
    assert m[("proxy_host_queue_depth", (("host", "a"),))] == 0
    # A name no model has is the client's mistake, on no host: host "" (no host in PromQL).
    assert m[("proxy_requests_total", (("endpoint", ep), ("host", ""), ("model", "__other__"),
                                       ("outcome", "refused")))] == 1
    # bounded: every other host label is a configured host
    hosts = {dict(labels)["host"] for _, labels in m if "host" in dict(labels)}
    assert hosts == {"a", "b", ""}


async def test_metrics_say_when_a_host_is_down(two, http):
    proxy, emus = two
    await take_down(proxy, emus, "b")
    m = await metrics(http, proxy)
    assert m[("proxy_host_up", (("host", "a"),))] == 1
    assert m[("proxy_host_up", (("host", "b"),))] == 0
    assert m[("proxy_upstream_up", ())] == 1    # the fleet still serves


async def test_a_single_server_has_no_host_label_and_no_host_gauges(proxy, http):
    assert (await chat(http, proxy, "qwen/qwen3-4b"))[0] == 200
    m = await metrics(http, proxy)
    assert ("proxy_model_loaded", (("model", "qwen/qwen3-4b"),)) in m
    assert not any("host" in dict(labels) for _, labels in m)
    assert not any(name.startswith("proxy_host_") for name, _ in m)


async def test_events_from_a_fleet_name_their_host_and_the_snapshot_shows_each_host(two, http):
    proxy, _ = two
    async with http.get(f"{proxy.url}/proxy/events") as r:
        events = SseReader(r)
        snapshot = await events.next()
        await proxy.engine.load(MID, host="b")
        seen = await events.until(lambda e: e.type == "load" and e.data["model"] == MID)
        await chat(http, proxy, MID)
        hub = proxy.app[EVENTS]
        hub.tick()
        hub.publish("test", {"i": "marker"})
        ticked = await events.until(lambda e: e.type == "test")
    hosts = snapshot.data["hosts"]
    assert set(hosts) == {"a", "b"}
    assert hosts["a"]["total_bytes"] == 12 * GB and hosts["b"]["total_bytes"] == 20 * GB
    assert hosts["a"]["up"] and hosts["a"]["loaded_models"] == []
    assert {m["model"]: m["host"] for m in snapshot.data["models"]}[MID] in ("a", "b")
    states = [(e.data["new"], e.data["host"]) for e in seen if e.type == "state"]
    assert states == [("loading", "b"), ("loaded", "b")]
    assert seen[-1].data["host"] == "b" and seen[-1].data["footprint_bytes"] == 6 * GB
    summaries = [e.data["models"][MID] for e in ticked if e.type == "requests"]
    assert summaries == [{**summaries[0], "hosts": {"b": 1}}]
    memory = [e.data for e in seen + ticked if e.type == "memory"]
    assert memory and memory[-1]["hosts"]["b"]["loaded_models"] == [MID]
    assert memory[-1]["hosts"]["b"]["available_bytes"] == 14 * GB
    assert memory[-1]["total_bytes"] == 32 * GB   # the fleet's: the hosts summed


async def test_single_server_events_have_no_host(proxy, http):
    async with http.get(f"{proxy.url}/proxy/events") as r:
        events = SseReader(r)
        snapshot = await events.next()
        await chat(http, proxy, "qwen/qwen3-4b")
        seen = await events.until(lambda e: e.type == "load")
    assert "hosts" not in snapshot.data and "hosts" not in snapshot.data["memory"]
    assert not any("host" in e.data for e in seen)


async def test_health_lists_each_host_and_alerts_when_one_is_down(two, http):
    proxy, emus = two
    async with http.get(f"{proxy.url}/proxy/health") as r:
        healthy = await r.json()
    assert healthy["status"] == "ok"
    assert {n: h["up"] for n, h in healthy["system_health"]["hosts"].items()} == \
        {"a": True, "b": True}
    await take_down(proxy, emus, "b")
    async with http.get(f"{proxy.url}/proxy/health") as r:
        report = await r.json()
    hosts = report["system_health"]["hosts"]
    assert hosts["a"]["up"] and not hosts["b"]["up"] and hosts["b"]["error"]
    alerts = [a for a in report["alerts"] if a["rule"] == "host_down"]
    assert [a["id"] for a in alerts] == ["host_down:b"]
    assert alerts[0]["severity"] == "warning" and "'b'" in alerts[0]["message"]
    assert report["status"] == "degraded"
    await take_down(proxy, emus, "a")
    async with http.get(f"{proxy.url}/proxy/health") as r:
        report = await r.json()
    assert {a["id"] for a in report["alerts"] if a["rule"] == "host_down"} == \
        {"host_down:a", "host_down:b"}
    assert report["status"] == "critical"


async def test_single_server_health_has_no_hosts(proxy, http):
    async with http.get(f"{proxy.url}/proxy/health") as r:
        report = await r.json()
    assert "hosts" not in report["system_health"]
    assert not any("host" in row for row in report["models"].values())


async def test_readyz_is_ready_while_any_host_is_up_and_lists_each_host(two, http):
    proxy, emus = two
    async with http.get(f"{proxy.url}/readyz") as r:
        assert r.status == 200
        body = await r.json()
    assert body["ready"] and body["hosts_up"] == 2
    assert set(body["hosts"]) == {"a", "b"} and body["hosts"]["a"]["api_level"]
    await take_down(proxy, emus, "a")
    async with http.get(f"{proxy.url}/readyz") as r:
        assert r.status == 200
        body = await r.json()
    assert body["hosts_up"] == 1 and not body["hosts"]["a"]["up"] and body["hosts"]["b"]["up"]
    assert body["hosts"]["a"]["error"]
    await take_down(proxy, emus, "b")
    async with http.get(f"{proxy.url}/readyz") as r:
        assert r.status == 503
        body = await r.json()
    assert not body["ready"] and body["hosts_up"] == 0 and body["error"]


async def test_a_host_the_proxy_cannot_load_on_shows_no_residency_and_no_memory(
        make_emulator, make_proxy, http):
    """An OpenAI-compatible host beside a managed one: its models' state there is `unknown`
    (not `unloaded`), and its memory is in no figure, pressure or footprint of the fleet."""
    emus = {n: await make_emulator(catalog=CATALOG) for n in ("a", "b")}
    proxy = await make_proxy("", config=fleet_config([], upstreams=[
        {"name": "a", "url": emus["a"].url, "budget_gb": 12},
        {"name": "b", "url": emus["b"].url, "budget_gb": 20, "kind": "openai"}]))
    await proxy.engine.load(SMALL, host="a")
    async with http.get(f"{proxy.url}/proxy/models") as r:
        rows = {row["model"]: row for row in (await r.json())["data"]}
    assert rows[SMALL]["hosts"] == {"a": "loaded", "b": "unknown"}
    assert rows[SMALL]["state"] == "loaded" and rows[SMALL]["footprint_mb"] == 2400
    assert rows[MID]["hosts"] == {"a": "unloaded", "b": "unknown"}
    async with http.post(f"{proxy.url}/proxy/models/load",
                         json={"model": MID, "host": "b"}) as r:
        body = await r.json()
    assert r.status == 409 and "(upstream.kind: openai)" in body["error"]["message"]
    async with http.post(f"{proxy.url}/proxy/models/unload",
                         json={"model": SMALL, "host": "b"}) as r:
        body = await r.json()     # refused as the load is, not "unloaded": false
    assert r.status == 409 and "cannot be unloaded" in body["error"]["message"], body

    async with http.get(f"{proxy.url}/proxy/stats") as r:
        stats = await r.json()
    assert stats["memory_managed"] is True and stats["memory_pressure"] == "low"
    assert stats["system_memory"]["total_gb"] == 12          # host a's budget only
    assert stats["hosts"]["b"]["memory"] is None and stats["hosts"]["b"]["memory_pressure"] is None
    assert stats["hosts"]["b"]["memory_managed"] is False
    assert stats["hosts"]["a"]["memory"]["total_gb"] == 12
    assert stats["model_counts"]["unknown"] == len(CATALOG)
    m = await metrics(http, proxy)
    assert ("proxy_model_loaded", (("host", "b"), ("model", SMALL))) not in m
    assert ("proxy_model_footprint_bytes", (("host", "b"), ("model", SMALL))) not in m
    assert m[("proxy_model_loaded", (("host", "a"), ("model", SMALL)))] == 1
    assert ("proxy_host_memory_total_bytes", (("host", "b"),)) not in m
    assert m[("proxy_memory_total_bytes", ())] == 12 * GB
    async with http.post(f"{proxy.url}/proxy/models/unload", json={"model": SMALL}) as r:
        body = await r.json()     # no host named: where it can be (host b is not asked)
    assert r.status == 200 and body["unloaded_on"] == ["a"] and body["failed"] == {}, body


async def test_a_model_used_and_unloaded_on_another_host_is_not_shown_as_never_used(two, http):
    """Its row comes from the first host that lists it (`a`) once it is resident nowhere; its
    last use, loads and evictions were on `b`: the row says so, not "never used", 0 loads."""
    proxy, _ = two
    await proxy.engine.load(SMALL, host="b")
    status, _, headers = await chat(http, proxy, SMALL)
    assert status == 200 and headers["X-Proxy-Host"] == "b"
    async with http.post(f"{proxy.url}/proxy/models/unload", json={"model": SMALL}) as r:
        assert r.status == 200 and (await r.json())["unloaded_on"] == ["b"]
    async with http.get(f"{proxy.url}/proxy/models") as r:
        row = {row["model"]: row for row in (await r.json())["data"]}[SMALL]
    assert row["host"] == "a" and row["state"] == "unloaded" and row["requests"] == 1
    assert row["last_used_s_ago"] is not None and row["last_used_s_ago"] < 30
    assert row["loads"] == 1 and row["evictions"] == {"manual": 1}
    assert row["avg_load_time_s"] is not None
    async with http.get(f"{proxy.url}/proxy/events") as r:   # the dashboard's snapshot too
        snapshot = await SseReader(r).next()
    shown = {m["model"]: m for m in snapshot.data["models"]}[SMALL]
    assert shown["last_used_s_ago"] is not None and shown["loads"] == 1
