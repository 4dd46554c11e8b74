"""One line per request at INFO, with model, status, latency, ttft and tokens."""
from __future__ import annotations

import logging


async def test_each_request_logs_one_line_at_info(proxy, http, caplog):
    caplog.set_level(logging.INFO, logger="proxy.request")
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": "qwen/qwen3-4b", "max_tokens": 3, "stream": True, "messages": []}) as r:
        await r.read()
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": "nope", "messages": []}) as r:
        await r.read()
    from proxy.server.keys import ACCESS_LOG
    proxy.app[ACCESS_LOG].flush()
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.request"]
    assert len(lines) == 2
    assert lines[0].startswith("POST /v1/chat/completions qwen/qwen3-4b 200 ")
    assert "ttft=" in lines[0] and "tokens=" in lines[0] and "/3" in lines[0]
    assert lines[1].startswith("POST /v1/chat/completions nope 404 ")
