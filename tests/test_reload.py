"""Hot reload: validated first, applied without unloading; and what a shutdown deadline does to
requests still running."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest

from proxy.app import create_app
from proxy.library import ModelMemoryManager
from proxy.errors import ConfigError
from proxy.server.reload import restart_needed
from proxy.server.serving import serve

from .conftest import proxy_config

MODEL = "qwen/qwen3-4b"
ADMIN = {"Authorization": "Bearer adm"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_apply_config_swaps_aliases_thresholds_and_budget():
    old = proxy_config("http://127.0.0.1:1")
    engine = ModelMemoryManager(config=old)
    new = proxy_config("http://127.0.0.1:1", **{
        "models": {MODEL: {"aliases": ["fast"], "priority": 9}},
        "memory.max_memory_usage_percent": 60, "memory.min_free_memory_gb": 2,
        "memory.budget_gb": 32})
    engine.apply_config(new)
    assert engine.config is new and engine.priority(MODEL) == 9
    assert engine.core.registry.aliases == {"fast": MODEL}
    gauge = engine.core.monitor.gauge
    assert gauge.max_usage_percent == 60 and gauge.min_free_bytes == 2e9
    assert engine.core.sampler.sample().total_bytes == 32e9


def test_restart_needed_names_start_only_settings_and_hides_tokens():
    old = proxy_config("http://a:1")
    new = proxy_config("http://b:1", **{"server.port": 9999, "upstream.api_token": "t",
                                        "models": {MODEL: {"priority": 9}}})
    changed = restart_needed(old, new)
    assert "server.port (8080 → 9999)" in changed
    assert "upstream.url ('http://a:1' → 'http://b:1')" in changed
    assert "upstream.api_token" in changed and not any("'t'" in c for c in changed)
    assert not any(c.startswith("models") for c in changed)


@pytest.fixture
async def reloadable(make_proxy, emulator):
    """A proxy whose config source the test sets (a ConfigError, or a new config)."""
    box: dict = {"next": None}

    def source():
        if isinstance(box["next"], Exception):
            raise box["next"]
        return box["next"]

    auth = {"auth.admin_token": "adm"}
    proxy = await make_proxy(emulator.url, config=proxy_config(emulator.url, **auth),
                             app_kwargs={"config_source": source})
    box["auth"] = auth
    return proxy, box


async def test_post_reload_applies_without_unloading(reloadable, emulator, http):
    proxy, box = reloadable
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200
    box["next"] = proxy_config(emulator.url, **box["auth"], **{
        "models": {MODEL: {"aliases": ["fast"], "priority": 8, "pinned": True}},
        "eviction.policy": "lru", "server.port": 1})
    async with http.post(f"{proxy.url}/proxy/reload") as r:
        assert r.status == 401                      # admin only
    async with http.post(f"{proxy.url}/proxy/reload", headers=ADMIN) as r:
        result = await r.json()
    assert result == {"reloaded": True, "restart_needed": ["server.port (8080 → 1)"]}
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={**CHAT, "model": "fast"}) as r:
        assert r.status == 200                      # the new alias works
    engine = proxy.engine
    assert engine.priority(MODEL) == 8 and engine.config.eviction.policy == "lru"
    assert engine.config.model(MODEL).pinned
    assert sum(emulator.state.unload_calls.values()) == 0
    assert engine.loaded_models() == [MODEL]


async def test_an_invalid_reload_is_rejected_with_every_problem(reloadable, http, caplog):
    caplog.set_level(logging.ERROR, logger="proxy.reload")
    proxy, box = reloadable
    before = proxy.engine.config
    box["next"] = ConfigError(["models.x.priority: must be 1..10 (got 99)",
                               "bogus: unknown key"])
    async with http.post(f"{proxy.url}/proxy/reload", headers=ADMIN) as r:
        status, error = r.status, (await r.json())["error"]
    assert status == 400 and error["code"] == "invalid_config"
    assert "must be 1..10" in error["message"] and "bogus" in error["message"]
    assert proxy.engine.config is before
    assert "bogus: unknown key" in caplog.text


async def test_reload_swaps_the_keys(reloadable, emulator, http):
    proxy, box = reloadable
    box["next"] = proxy_config(emulator.url, **box["auth"], **{
        "auth.keys": [{"name": "new", "key": "sk-new"}]})
    async with http.post(f"{proxy.url}/proxy/reload", headers=ADMIN) as r:
        assert r.status == 200
    url = f"{proxy.url}/v1/chat/completions"
    async with http.post(url, json=CHAT) as anon, \
            http.post(url, json=CHAT, headers={"Authorization": "Bearer sk-new"}) as keyed:
        assert (anon.status, keyed.status) == (401, 200)


async def test_at_the_shutdown_deadline_a_waiting_request_gets_503(emulator, http):
    app = create_app(proxy_config(emulator.url))
    served = await serve(app, shutdown_timeout_s=0.3)
    async with http.post(f"{served.url}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200
    emulator.state.faults.hang_inference = True
    pending = asyncio.ensure_future(http.post(f"{served.url}/v1/chat/completions", json=CHAT))
    await emulator.state.wait_for(lambda: emulator.state.hung_requests == 1)
    started = time.monotonic()
    await served.close()
    assert time.monotonic() - started < 0.3 + 1.5
    resp = await pending
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "shutting_down"
    resp.release()


async def test_reload_sets_the_log_level(reloadable, emulator, http):
    proxy, box = reloadable
    root = logging.getLogger()
    before = root.level
    box["next"] = proxy_config(emulator.url, **box["auth"], **{"logging.level": "ERROR"})
    try:
        async with http.post(f"{proxy.url}/proxy/reload", headers=ADMIN) as r:
            assert r.status == 200
        assert root.level == logging.ERROR
    finally:
        root.setLevel(before)


async def test_reload_without_a_config_source_says_so(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url)
    async with http.post(f"{proxy.url}/proxy/reload") as r:
        status, error = r.status, (await r.json())["error"]
    assert status == 400 and "nothing to reload from" in error["message"]


def test_restart_needed_redacts_credentials_in_a_changed_url():
    old = proxy_config("http://alice:s3cret@a:1")
    new = proxy_config("http://bob:hunter2@b:1")
    changed = [c for c in restart_needed(old, new) if c.startswith("upstream.url")]
    assert changed == ["upstream.url ('http://***@a:1' → 'http://***@b:1')"]
