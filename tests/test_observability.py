"""Metrics, the stats shape, alert rules opening and clearing, the webhook, persistence."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import HealthConfig
from proxy.configload import load_config
from proxy.emulator import CatalogModel
from proxy.engine.clock import ManualClock
from proxy.handlers.probes import READINESS
from proxy.observe.health import ModelHealthMonitor
from proxy.library import ModelMemoryManager
from proxy.engine.usage import RequestRecord
from proxy.observe.webhook import WebhookSink
from proxy.server.serving import serve
from proxy.store import UsageStore
from proxy.upstream.lmstudio import LMStudioUpstream

from .fakes import GB, SettableSampler

MODEL = "qwen/qwen3-4b"


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_after_real_traffic(proxy, http):
    for stream in (False, False, True):
        async with http.post(f"{proxy.url}/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 4, "stream": stream, "messages": []}) as r:
            await r.read()
    for typo in ("qwen-typo", "another-typo"):
        async with http.post(f"{proxy.url}/v1/chat/completions",
                             json={"model": typo, "messages": []}) as r:
            assert r.status == 404
    async with http.get(f"{proxy.url}/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        m = samples(await r.text())
    ep = "/v1/chat/completions"
    assert m[("proxy_requests_total", (("endpoint", ep), ("model", MODEL),
                                       ("outcome", "success")))] == 3
    assert m[("proxy_requests_total", (("endpoint", ep), ("model", "__other__"),
                                       ("outcome", "refused")))] == 2   # no model's failure
    assert m[("proxy_tokens_total", (("kind", "completion"), ("model", MODEL)))] == 12
    assert m[("proxy_request_duration_seconds_count", (("model", MODEL),))] == 3
    assert m[("proxy_time_to_first_token_seconds_count", (("model", MODEL),))] == 1
    assert m[("proxy_model_loaded", (("model", MODEL),))] == 1
    assert m[("proxy_model_loads_total", (("model", MODEL), ("outcome", "success")))] == 1
    assert m[("proxy_model_load_duration_seconds_count", (("model", MODEL),))] == 1
    assert m[("proxy_memory_pressure", (("level", "low"),))] == 1
    assert ("proxy_memory_available_bytes", ()) in m and ("proxy_queue_depth", ()) in m
    assert not any(dict(labels).get("model") == "qwen-typo" for _, labels in m)


async def test_stats_shape(proxy, http):
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": MODEL, "max_tokens": 2, "messages": []}) as r:
        await r.read()
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        stats = await r.json()
    assert set(stats["system_memory"]) == {"total_gb", "available_gb", "used_percent"}
    assert stats["memory_pressure"] in ("low", "normal", "high", "critical")
    assert set(stats["model_counts"]) == {"loaded", "loading", "unloaded", "unloading", "error"}
    top = stats["top_models_by_usage"][0]
    assert set(top) == {"model", "frequency", "requests", "success_rate", "avg_latency_ms"}
    detail = stats["models"][MODEL]
    for key in ("requests", "success_rate", "avg_latency_ms", "p50_latency_ms",
                "p95_latency_ms", "p99_latency_ms", "avg_ttft_ms", "prompt_tokens",
                "completion_tokens", "tokens_per_s", "usage_frequency_per_h", "trend", "loads",
                "avg_load_time_s", "footprint_mb", "evictions", "last_used_s_ago"):
        assert key in detail, key
    # The library's dict, plus the HTTP layer's compat repair counts.
    assert stats == proxy.engine.report() | {"system_memory": stats["system_memory"],
                                                       "models": stats["models"],
                                                       "compat": stats["compat"],
                                                       "auth": stats["auth"]}


async def monitored(url, clock, sampler=None, **health):
    config = load_config({"upstream": {"url": url},
                          "memory": {"sampler": "local", "min_free_memory_gb": 4},
                          "health": {"min_requests": 3, **health},
                          "storage": {"enabled": False}})
    mgr = ModelMemoryManager(config=config, upstream=LMStudioUpstream(config.upstream),
                             clock=clock, sampler=sampler or SettableSampler(),
                             owns_upstream=True)
    await mgr.start()
    return mgr, ModelHealthMonitor(mgr)


def ids(report):
    return {a["id"] for a in report["alerts"]}


async def test_error_rate_alert_opens_and_clears(emulator):
    clock = ManualClock()
    mgr, mon = await monitored(emulator.url, clock)
    for ok in (False, False, True, False):
        mgr.record(RequestRecord(model=MODEL, ok=ok, latency_s=0.1, at_s=clock.now()))
    assert f"error_rate:{MODEL}" in ids(await mon.check())
    clock.advance(600)
    assert f"error_rate:{MODEL}" not in ids(await mon.check())
    await mgr.cleanup()


async def test_latency_regression_against_own_baseline(emulator):
    clock = ManualClock()
    mgr, mon = await monitored(emulator.url, clock)

    def traffic(n, latency_s):
        for _ in range(n):
            mgr.record(RequestRecord(model=MODEL, ok=True, latency_s=latency_s,
                                     at_s=clock.now()))
    await mon.check()
    traffic(20, 0.1)
    clock.advance(300)
    await mon.check()
    traffic(10, 1.0)                       # ten times slower than its own baseline
    clock.advance(300)
    assert f"latency_regression:{MODEL}" in ids(await mon.check())
    traffic(10, 0.1)
    clock.advance(300)
    assert f"latency_regression:{MODEL}" not in ids(await mon.check())
    await mgr.cleanup()


async def test_memory_critical_and_upstream_unreachable_alerts(make_emulator):
    emu = await make_emulator()
    clock, sampler = ManualClock(), SettableSampler()
    mgr, mon = await monitored(emu.url, clock, sampler)
    sampler.set_available(1)
    await mgr.sample_memory()
    assert "memory_critical" in ids(await mon.check())
    sampler.set_available(30)
    await mgr.sample_memory()
    assert "memory_critical" not in ids(await mon.check())
    await emu.close()
    await mgr.reconcile()
    report = await mon.check()
    assert "upstream_unreachable" in ids(report) and report["status"] == "critical"
    await mgr.cleanup()


async def test_load_past_its_timeout_alerts_until_it_finishes(emulator):
    clock = ManualClock()
    mgr, mon = await monitored(emulator.url, clock)
    gate = emulator.state.faults.load_gate[MODEL] = asyncio.Event()
    task = asyncio.create_task(mgr.acquire(MODEL))
    await emulator.state.wait_for(lambda: emulator.state.loading[MODEL] == 1)
    clock.advance(601)                                  # upstream.load_timeout_s is 600
    report = await mon.check()
    assert f"load_stuck:{MODEL}" in ids(report) and f"hang:queued:{MODEL}" in ids(report)
    gate.set()
    (await task).release()
    assert not ids(await mon.check())
    await mgr.cleanup()


async def _hung_request(make_proxy, emulator, http):  # noqa: ANN001, ANN202 - fixtures
    """A request through the proxy that the upstream never answers: (proxy, clock, task)."""
    clock = ManualClock()
    proxy = await make_proxy(emulator.url, app_kwargs={"clock": clock})
    emulator.state.faults.hang_inference = True
    request = asyncio.create_task(http.post(f"{proxy.url}/v1/chat/completions",
                                            json={"model": MODEL, "messages": []}))
    await emulator.state.wait_for(lambda: emulator.state.hung_requests == 1)
    return proxy, clock, request


async def test_silent_hang_through_the_proxy_opens_and_clears(make_proxy, emulator, http):
    proxy, clock, request = await _hung_request(make_proxy, emulator, http)
    clock.advance(121)
    async with http.get(f"{proxy.url}/proxy/health") as r:
        report = await r.json()
    assert f"hang:in_flight:{MODEL}" in ids(report) and report["status"] == "critical"
    released = asyncio.Event()
    proxy.engine.add_listener(type("L", (), {"on_request": lambda s, r: released.set()})())
    request.cancel()                                     # the client gives up
    await released.wait()
    async with http.get(f"{proxy.url}/proxy/health") as r:
        assert not ids(await r.json())


async def test_a_request_silent_for_less_than_the_threshold_is_no_hang(make_proxy, emulator,
                                                                         http):
    """A lease's silence counts from its start: a minute without a byte (under
    hang_threshold_s) raises nothing."""
    proxy, clock, request = await _hung_request(make_proxy, emulator, http)
    clock.advance(60)
    async with http.get(f"{proxy.url}/proxy/health") as r:
        assert f"hang:in_flight:{MODEL}" not in ids(await r.json())
    released = asyncio.Event()
    proxy.engine.add_listener(type("L", (), {"on_request": lambda s, r: released.set()})())
    request.cancel()
    await released.wait()


async def test_webhook_receives_firing_and_resolved_with_retry(emulator):
    received: list[dict] = []
    attempts = 0

    async def hook(request):
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            return web.Response(status=500)             # first delivery fails: retried
        received.append(await request.json())
        return web.Response(status=204)
    app = web.Application()
    app.router.add_post("/alerts", hook)
    server = await serve(app)
    url = f"{server.url}/alerts"
    sink = WebhookSink(lambda: HealthConfig(webhook_url=url), first_backoff_s=0.01)
    await sink.start()
    clock, sampler = ManualClock(), SettableSampler()
    mgr, _ = await monitored(emulator.url, clock, sampler)
    mon = ModelHealthMonitor(mgr, sink=sink)
    sampler.set_available(1)
    await mgr.sample_memory()
    await mon.check()
    await sink.drain()
    sampler.set_available(30)
    await mgr.sample_memory()
    await mon.check()
    await sink.drain()
    assert [(e["status"], e["id"]) for e in received] == [("firing", "memory_critical"),
                                                          ("resolved", "memory_critical")]
    assert attempts == 3 and sink.delivered == 2
    await sink.close()
    await server.close()
    await mgr.cleanup()


class EmulatedHostSampler:
    """A local sampler over the emulator's memory account: loads show up as drops."""
    blocking = False
    local = True

    def __init__(self, state, total_bytes=int(64 * GB)):
        self.state, self.total_bytes = state, total_bytes

    def sample(self):
        from proxy.engine.memory import MemorySample
        return MemorySample(self.total_bytes, self.total_bytes - self.state.used_bytes())


async def test_history_and_footprints_survive_restart_and_crash(make_emulator, tmp_path):
    emu = await make_emulator(catalog=[CatalogModel("lab/m", size_bytes=int(4 * GB),
                                                    memory_bytes=int(5 * GB))])
    path = tmp_path / "history.sqlite3"

    async def manager():
        config = load_config({"upstream": {"url": emu.url},
                              "memory": {"sampler": "local", "min_free_memory_gb": 1}})
        mgr = ModelMemoryManager(config=config, upstream=LMStudioUpstream(config.upstream),
                                 sampler=EmulatedHostSampler(emu.state), owns_upstream=True,
                                 store=UsageStore(path))
        await mgr.start()
        return mgr
    first = await manager()
    (await first.acquire("lab/m")).release()
    first.record(RequestRecord(model="lab/m", ok=True, latency_s=0.5, at_s=first.clock.now(),
                               completion_tokens=7))
    assert first.entry("lab/m").footprint_bytes == 5 * GB          # learned from the drop
    await first.cleanup()                                          # clean shutdown flushes
    second = await manager()
    assert second.usage("lab/m").requests == 1 and second.usage("lab/m").completion_tokens == 7
    assert second.entry("lab/m").footprint_bytes == 5 * GB
    assert second.usage("lab/m").latency.quantile(0.5) == pytest.approx(0.5, rel=0.1)
    second.record(RequestRecord(model="lab/m", ok=False, latency_s=1.0, at_s=0.0))
    await second.flush()                     # the periodic flush ran; then the process dies
    crashed = UsageStore(path)               # (no cleanup, no close: as after kill -9)
    assert crashed.open()
    assert crashed.load()["stats"]["lab/m"]["requests"] == 2
    assert sum(row[1] for row in crashed.history("lab/m", 0)) == 2
    crashed.close()
    await second.cleanup()


async def test_corrupt_database_is_reported_and_the_proxy_keeps_serving(
        make_proxy, emulator, http, tmp_path):
    path = tmp_path / "history.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    proxy = await make_proxy(emulator.url, **{"storage": {"enabled": True, "path": str(path)}})
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": MODEL, "max_tokens": 1, "messages": []}) as r:
        assert r.status == 200
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        persistence = (await r.json())["persistence"]
    (damage,) = persistence["damage"]          # moved aside, kept; a fresh file in its place
    assert persistence["ok"] is True and "not a database" in damage["error"]
    assert Path(damage["moved_to"]).read_bytes() == b"this is not a database" * 100


async def test_status_command_renders_a_glance(proxy, http, capsys):
    from proxy.cli import main
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": MODEL, "max_tokens": 1, "messages": []}) as r:
        await r.read()
    assert await asyncio.to_thread(main, ["status", "--url", proxy.url], {}) == 0
    out = capsys.readouterr().out
    assert "pressure" in out and MODEL in out and "loaded" in out


async def test_probes_are_counted_apart_and_a_failing_probe_alerts(make_proxy, emulator, http):
    clock = ManualClock()
    proxy = await make_proxy(emulator.url, app_kwargs={"clock": clock},
                             **{"health": {"probe_interval_s": 60}})
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": MODEL, "max_tokens": 1, "messages": []}) as r:
        assert r.status == 200
    async with http.get(f"{proxy.url}/proxy/health") as r:
        probe = (await r.json())["models"][MODEL]["probe"]
    assert probe["ok"] is True
    assert emulator.state.inference_calls[MODEL] == 2            # the request and the probe
    assert proxy.engine.usage(MODEL).requests == 1               # only the request counts
    emulator.state.faults.inference_status = 500
    clock.advance(61)
    async with http.get(f"{proxy.url}/proxy/health") as r:
        report = await r.json()
    assert f"probe_failed:{MODEL}" in ids(report)
    emulator.state.faults.inference_status = None
    clock.advance(61)
    async with http.get(f"{proxy.url}/proxy/health") as r:
        assert not ids(await r.json())


async def test_readyz_turns_when_the_upstream_dies_and_probes_share_one_look(make_proxy, http):
    from .test_auth import recording_emulator
    upstream, seen = await recording_emulator(None)
    clock = ManualClock()
    proxy = await make_proxy(upstream.url, app_kwargs={"clock": clock})   # the real default
    max_age_s = proxy.engine.config.upstream.readiness_max_age_s
    try:
        seen.clear()
        async with http.get(f"{proxy.url}/readyz") as r:
            assert r.status == 200
        assert seen == []                        # just looked (at start): no call
        clock.advance(max_age_s)
        statuses = await asyncio.gather(*(ready_status(http, proxy.url) for _ in range(20)))
        assert statuses == [200] * 20
        assert [p for p, _ in seen] == ["/api/v1/models"]     # one look for twenty probes
        clock.advance(max_age_s)     # twenty probes at the same instant: still one look
        seen.clear()
        await asyncio.gather(*(proxy.app[READINESS].refresh(proxy.engine, False)
                               for _ in range(20)))
        assert [p for p, _ in seen] == ["/api/v1/models"]
    finally:
        await upstream.close()
    clock.advance(max_age_s)
    async with http.get(f"{proxy.url}/readyz") as r:
        assert r.status == 503 and (await r.json())["ready"] is False


async def ready_status(http, url: str) -> int:
    async with http.get(f"{url}/readyz") as r:
        return r.status
