"""A client that leaves before the end of its answer (499): a request of the model's, never one
of its failures — in the statistics, the health alerts, the metrics and the history alike."""
from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson
import pytest

from proxy.app import create_app
from proxy.server.keys import ACCESS_LOG, ENGINE
from proxy.server.serving import serve

from .conftest import proxy_config
from .sse import SseReader
from .test_relay import Records, records_of, samples

pytestmark = pytest.mark.timeout(30)

MODEL = "qwen/qwen3-4b"
STREAM = orjson.dumps({"model": MODEL, "stream": True, "max_tokens": 50,
                       "messages": [{"role": "user", "content": "tell me"}]})
QUITTERS = 6        # past health.min_requests (5): enough for an error_rate alert


async def stats_and_alerts(http: aiohttp.ClientSession, url: str) -> tuple[dict, list]:
    async with http.get(f"{url}/proxy/stats") as r:
        row = (await r.json())["models"][MODEL]
    async with http.get(f"{url}/proxy/health") as r:
        alerts = (await r.json())["alerts"]
    return {k: row[k] for k in ("requests", "failures", "client_closed", "success_rate")}, alerts


async def test_clients_that_leave_early_are_requests_not_failures_before_and_after_a_restart(
        emulator, http, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="proxy.request")
    config = proxy_config(emulator.url, **{"storage.enabled": True,
                                           "storage.path": str(tmp_path / "history.sqlite3"),
                                           "server.loading_progress_interval_s": 0.1})
    app = create_app(config)
    served = await serve(app)
    try:
        counted = Records()
        app[ENGINE].add_listener(counted)
        url = f"{served.url}/v1/chat/completions"
        # One gives up while the model loads (it heard a progress note) ...
        loaded = emulator.state.faults.load_gate[MODEL] = asyncio.Event()
        async with http.post(url, data=STREAM) as resp:
            assert (await resp.content.readline()).startswith(b": ")
            resp.close()
        await counted.until(1)
        loaded.set()
        await app[ENGINE].load(MODEL)
        # ... the others once the first chunk of the answer is theirs.
        emulator.state.faults.stream_gate = asyncio.Event()    # never set: the rest never comes
        for n in range(2, QUITTERS + 1):
            resp = await http.post(url, data=STREAM)
            assert b'"content"' in await resp.content.readuntil(b"\n\n")
            resp.close()
            await counted.until(n)
        assert [r.status for r in counted.seen] == [499] * QUITTERS
        expected = {"requests": QUITTERS, "failures": 0, "client_closed": QUITTERS,
                    "success_rate": 1.0}
        assert await stats_and_alerts(http, served.url) == (expected, [])
        async with http.get(f"{served.url}/metrics") as r:
            m = samples(await r.text())
        outcomes = {dict(labels)["outcome"]: v for (name, labels), v in m.items()
                    if name == "proxy_requests_total" and dict(labels)["model"] == MODEL}
        assert outcomes == {"client_closed": QUITTERS}
        # The chunk each mid-stream quitter had is counted (estimated: no usage came).
        usage = app[ENGINE].usage(MODEL)
        assert usage.completion_tokens == QUITTERS - 1 == usage.estimated_tokens
        app[ACCESS_LOG].flush()
        lines = [r.getMessage() for r in caplog.records if r.name == "proxy.request"]
        assert sum(" 499 " in line and line.endswith("tokens=0/1 (estimated)")
                   for line in lines) == QUITTERS - 1
    finally:
        await served.close()           # flushes the history
    restarted = await serve(create_app(config))
    try:
        assert await stats_and_alerts(http, restarted.url) == (expected, [])
    finally:
        await restarted.close()


async def test_a_client_that_leaves_is_no_error_on_the_dashboard_nor_in_its_tasks_figures(
        make_proxy, emulator, http):
    """The per-second summary the event stream sends counts it a request, no error; the task
    it was tagged with counts it no failure (the recommendations' success rate per task)."""
    proxy = await make_proxy(emulator.url)
    counted = records_of(proxy)
    await proxy.engine.load(MODEL)
    async with http.get(f"{proxy.url}/proxy/events") as events_resp:
        events = SseReader(events_resp)
        assert (await events.next()).type == "snapshot"
        emulator.state.faults.stream_gate = asyncio.Event()    # never set: the rest never comes
        resp = await http.post(f"{proxy.url}/v1/chat/completions", data=STREAM,
                               headers={"X-Task-Type": "coding"})
        assert b'"content"' in await resp.content.readuntil(b"\n\n")
        resp.close()
        await counted.until(1)
        assert counted.seen[0].status == 499
        (summary,) = [e for e in await events.until(
            lambda e: e.type == "requests" and MODEL in e.data["models"])
            if e.type == "requests"]
    row = summary.data["models"][MODEL]
    assert (row["requests"], row["errors"]) == (1, 0) and "error_statuses" not in row
    assert proxy.engine.usage(MODEL).tasks["coding"][:2] == [1, 0]
