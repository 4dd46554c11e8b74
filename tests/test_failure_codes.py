"""A failed request says why wherever it is shown: its error code — the proxy's own, or the
one in the server's error body — is kept with its record, shown in the dashboard's recent
errors, and named as the latest failure in the error_rate alert."""
from __future__ import annotations

import pytest

from proxy.emulator.catalog import CatalogModel
from proxy.server.keys import EVENTS, HEALTH
from proxy.server.streaming import error_code

from .fakes import GB

pytestmark = pytest.mark.timeout(60)

MODEL = "qwen/qwen3-4b"
SMALL, HUGE = "lab/small-2b", "lab/huge-70b"
CATALOG = [CatalogModel(key=SMALL, size_bytes=2 * GB, memory_bytes=2 * GB),
           CatalogModel(key=HUGE, size_bytes=50 * GB, memory_bytes=50 * GB)]


async def chat(http, url: str, model: str) -> int:
    async with http.post(f"{url}/v1/chat/completions", json={
            "model": model, "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}) as r:
        await r.read()
        return r.status


def test_the_code_is_read_from_an_openai_error_body_and_nothing_else():
    assert error_code(b'{"error": {"message": "m", "type": "t", "code": "c"}}') == "c"
    assert error_code(b'{"error": {"message": "m", "type": "server_error"}}') == "server_error"
    assert error_code(b'{"error": "No models loaded."}') is None        # LM Studio's strings
    assert error_code(b"<html>502</html>") is None and error_code(b"[1]") is None
    assert error_code(b'{"error": {"code": "' + b"x" * 500 + b'"}}') == "x" * 64


async def test_a_servers_failure_names_its_code_in_the_alert_and_the_recent_errors(
        make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url)
    emulator.state.faults.inference_status = 500
    for _ in range(6):                                 # past health.min_requests (5)
        assert await chat(http, proxy.url, MODEL) == 500
    report = await proxy.app[HEALTH].check()
    alert = next(a for a in report["alerts"] if a["id"] == f"error_rate:{MODEL}")
    assert alert["message"].endswith("requests failed in the last 300s (latest: 500 server_error)")
    latest = list(proxy.app[EVENTS].errors)[-1]
    assert latest["code"] == "server_error"
    assert latest["message"] == "500 server_error on /v1/chat/completions"


async def test_the_proxys_own_refusal_names_its_code(make_emulator, make_proxy, http):
    emu = await make_emulator(catalog=CATALOG)
    proxy = await make_proxy(emu.url, **{"memory.budget_gb": 16,
                                          "memory.max_memory_usage_percent": 100})
    assert await chat(http, proxy.url, HUGE) == 503
    latest = list(proxy.app[EVENTS].errors)[-1]
    assert latest["message"] == "503 model_too_large on /v1/chat/completions"
    assert proxy.engine.usage(HUGE).last_failure[1:] == (503, "model_too_large")
