"""One running configuration: a reload (a real SIGHUP) changes every key, and each one is either
in force through the live holder or reported as needing a restart, never silently ignored."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import typing
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest
import yaml
from aiohttp import web

from proxy.app import create_app
from proxy.cli import _reload_on_signal, build_parser, resolve_config
from proxy.config import Config
from proxy.configload import load_config
from proxy.errors import ConfigError
from proxy.server.inflight import INFLIGHT
from proxy.server.keys import AUTH, COMPAT, CONFIG, ENGINE, HEALTH
from proxy.liveconfig import LiveConfig
from proxy.server.reload import RELOADER, start_only_paths
from proxy.server.serving import serve

from .conftest import Proxy

MODEL = "qwen/qwen3-4b"
EMBED = "text-embedding-nomic-embed-text-v1.5"
KEY_A, KEY_B, KEY_C, ADMIN_OLD, ADMIN_NEW = "sk-a", "sk-b", "sk-c", "adm", "adm2"
ENV = {"TEST_KEY_C": KEY_C, "TEST_ADMIN": ADMIN_NEW}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


# -- the schema: every leaf key, with `*` for a model's keys and `[]` for a client key's --------
def leaf_keys(cls: type = Config, prefix: str = "") -> Iterator[str]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            yield from leaf_keys(tp, path + ".")
            continue
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if inner:
            mark = ".*." if typing.get_origin(tp) is not tuple else "[]."
            yield from leaf_keys(inner[0], path + mark)
        else:
            yield path


def value_at(config: Config, key: str) -> Any:
    """A key's value; over every model (`*`) or client key (`[]`), the tuple of them."""
    if ".*." in key:
        head, name = key.split(".*.")
        return tuple(_attr(m, name) for m in value_at(config, head).values())
    if "[]." in key:
        head, name = key.split("[].")
        return tuple(getattr(k, name) for k in value_at(config, head))
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _attr(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def single_choice(key: str) -> bool:
    """A key with one allowed value (upstream.kind today) cannot be changed by any reload."""
    cls: Any = Config
    *parents, name = key.split(".")
    for p in parents:
        if p == "*":
            continue
        tp = typing.get_type_hints(cls)[p.removesuffix("[]")]
        cls = tp if dataclasses.is_dataclass(tp) else next(
            a for a in typing.get_args(tp) if dataclasses.is_dataclass(a))
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    choices = field.metadata.get("choices", ())
    return len(choices() if callable(choices) else choices) == 1


def base_raw(upstream_url: str) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream_url},
        "memory": {"sampler": "budget", "budget_gb": 64, "min_free_memory_gb": 0},
        "eviction": {"hold": 0},
        "storage": {"enabled": False},
        "state": {"url_env": "TEST_REDIS_URL"},
        "models": {MODEL: {}},
        "auth": {"keys": [{"name": "a", "key": KEY_A},
                          {"name": "a2", "key": "sk-a2", "models": [EMBED]}],
                 "admin_token": ADMIN_OLD},
    }


def changed_raw(hook_url: str, tmp_path: Path) -> dict[str, Any]:
    """Every key of base_raw's config with another valid value (a CA file must be one: it is
    written to tmp_path)."""
    shutil.copy(Path(__file__).parent / "tls" / "cert.pem", tmp_path / "ca.pem")
    return {
        "server": {"host": "127.0.0.2", "port": 8081, "max_body_bytes": 2048,
                   "shutdown_timeout_s": 5, "event_loop": "asyncio",
                   "allow_unauthenticated": True, "max_model_name_chars": 40,
                   "header_timeout_s": 5, "body_timeout_s": 7, "keepalive_timeout_s": 5,
                   "stall_timeout_s": 3, "max_connections": 50,
                   "loading_progress": "content", "loading_progress_interval_s": 0.5,
                   "allowed_hosts": ["proxy.lan"], "allowed_origins": ["http://localhost:3000"]},
        "upstream": {"kind": "openai", "url": "http://127.0.0.1:9", "api_token": "tok",
                     "connect_timeout_s": 1,
                     "read_timeout_s": 9, "load_timeout_s": 9, "max_connections": 9,
                     "client": "aiohttp", "ca_file": str(tmp_path / "ca.pem"),
                     "reconcile_interval_s": 9, "breaker_failures": 9,
                     "breaker_cooldown_s": 9, "readiness_max_age_s": 9,
                     "probe_timeout_s": 8},
        "memory": {"max_memory_usage_percent": 60, "min_free_memory_gb": 1,
                   "monitoring_interval": 5, "sampler": "local", "budget_gb": 32,
                   "footprint_factor": 1.5, "reclaim_timeout_s": 2},
        "eviction": {"policy": "lru", "model_timeout_hours": 1, "hold": "off",
                     "queue_timeout_s": 7, "fairness_s": 9, "manage_external": True},
        "models": {MODEL: {"priority": 8, "pinned": True, "ttl_s": 600, "aliases": ["fast"],
                           "footprint_gb": 3, "load": {"context_length": 2048},
                           "fit": {"min_context_length": 1024}, "host": "h1"}},
        "upstreams": [{"name": "h1", "url": "http://127.0.0.1:9", "api_token_env": "TEST_H1",
                       "budget_gb": 8, "sampler": "budget", "parallel": 2,
                       "labels": {"room": "closet"}, "models": ["qwen/*"],
                       **{k: v for k, v in {
                           "kind": "openai", "connect_timeout_s": 1, "read_timeout_s": 9,
                           "load_timeout_s": 9, "max_connections": 9, "client": "aiohttp",
                           "ca_file": str(tmp_path / "ca.pem"), "reconcile_interval_s": 9,
                           "breaker_failures": 9, "breaker_cooldown_s": 9,
                           "readiness_max_age_s": 9, "probe_timeout_s": 8,
                           "api_token": None}.items()}}],
        "placement": {"replicate_after_waiters": 3, "native_host": "h1"},
        "state": {"backend": "redis", "url": "redis://127.0.0.1:9/0", "url_env": None,
                  "key_prefix": "other:", "replica_id": "r9", "lease_ttl_s": 3,
                  "lock_ttl_s": 4, "unavailable_wait_s": 2, "timeout_s": 1},
        "tasks": {"chat": [MODEL]},
        "groups": [{"name": "pair", "members": ["fast", "other/model"], "policy": "exclusive"}],
        "preload": {"enabled": False, "min_probability": 0.9, "rhythm_min_rate": 2},
        "health": {"interval_s": 5, "error_rate_threshold": 0.9, "error_window_s": 120,
                   "min_requests": 9, "latency_regression_factor": 3, "latency_window_s": 60,
                   "hang_threshold_s": 9, "probe_interval_s": 9, "webhook_url": hook_url,
                   "webhook_timeout_s": 2, "webhook_max_attempts": 2},
        "storage": {"enabled": True, "path": str(tmp_path / "h.sqlite3"),
                    "retention_days": 9, "flush_interval_s": 9},
        "logging": {"level": "ERROR"},
        "native": {"max_frame_bytes": 4096, "evict": "always"},
        "metrics": {"inference_gateway": True},
        "compat": {"embeddings_base64": False, "embedding_usage": False,
                   "models_retrieve": False},
        "auth": {"keys": [{"name": "b", "key_sha256": hashlib.sha256(KEY_B.encode()).hexdigest(),
                           "models": [MODEL]},
                          {"name": "c", "key_env": "TEST_KEY_C"}],
                 "admin_token_env": "TEST_ADMIN", "read_only_access": "admin",
                 "metrics_access": "key"},
    }


# -- what "in force" means for each key the reload applies ---------------------------------------
class Running:
    """The proxy after the reload, and what a probe needs to look at it."""

    def __init__(self, proxy: Proxy, http: Any, emulator: Any, hook: list[dict]) -> None:
        self.proxy, self.http, self.emulator, self.hook = proxy, http, emulator, hook
        self.app, self.engine = proxy.app, proxy.engine

    async def status(self, method: str, path: str, headers: dict | None = None,
                     **kwargs: Any) -> int:
        async with self.http.request(method, self.proxy.url + path, headers=headers,
                                     **kwargs) as r:
            await r.read()
            return r.status

    async def json(self, method: str, path: str, headers: dict, **kwargs: Any) -> Any:
        async with self.http.request(method, self.proxy.url + path, headers=headers,
                                     **kwargs) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def row(self) -> dict:
        rows = (await self.json("GET", "/proxy/models", bearer(ADMIN_NEW)))["data"]
        return next(m for m in rows if m["model"] == MODEL)


Probe = Callable[[Running], Awaitable[bool]]


def chat(model: str, **extra: Any) -> dict:
    return {"json": {"model": model, "max_tokens": 2,
                     "messages": [{"role": "user", "content": "hi"}], **extra}}


async def _embedding_kept_as_floats(t: Running) -> bool:
    data = await t.json("POST", "/v1/embeddings", bearer(KEY_C), json={
        "model": EMBED, "input": "x", "encoding_format": "base64"})
    return isinstance(data["data"][0]["embedding"], list)


async def _alias_retrieved(t: Running) -> bool:
    found = await t.json("GET", "/v1/models/fast", bearer(KEY_B))
    chat_ok = await t.status("POST", "/v1/chat/completions", bearer(KEY_B), **chat("fast"))
    return found["id"] == MODEL and chat_ok == 200


async def _loaded_with_options(t: Running) -> bool:
    await _alias_retrieved(t)   # has loaded the model
    return [i.context_length for i in t.emulator.state.instances_of(MODEL)] == [2048]


async def _webhook_delivers(t: Running) -> bool:
    sink = t.app[HEALTH].sink
    sink.send({"id": "reload-test", "status": "firing"})
    await sink.drain()
    return [e["id"] for e in t.hook] == ["reload-test"]


async def _auto_routes(t: Running) -> bool:
    async with t.http.post(f"{t.proxy.url}/v1/chat/completions", headers=bearer(KEY_B),
                           **chat("auto:chat")) as r:
        return r.status == 200 and r.headers.get("X-Proxy-Model") == MODEL


async def _gateway_series_exposed(t: Running) -> bool:
    """Read per scrape (metrics_access is "key" after the reload)."""
    async with t.http.get(t.proxy.url + "/metrics", headers=bearer(KEY_B)) as r:
        return r.status == 200 and "vllm:num_requests_running{" in await r.text()


async def _counted_by_name(t: Running) -> bool:
    await t.status("POST", "/v1/chat/completions", bearer(KEY_B), **chat(MODEL))
    return "b" in t.app[AUTH].counters.requests_by_key


def value(read: Callable[[Running], Any], expected: Any) -> Probe:
    """The value as the part that uses it reads it (through the live holder)."""
    async def probe(t: Running) -> bool:
        return read(t) == expected
    return probe


def status(method: str, path: str, secret: str | None, expected: int, *,
           headers: dict | None = None, **kw: Any) -> Probe:
    async def probe(t: Running) -> bool:
        sent = {**(bearer(secret) if secret else {}), **(headers or {})}
        return await t.status(method, path, sent or None, **kw) == expected
    return probe


def row_field(name: str, expected: Any) -> Probe:
    async def probe(t: Running) -> bool:
        return (await t.row())[name] == expected
    return probe


def _footprint(t: Running) -> tuple[str, float]:
    e = t.engine.registry.entries[MODEL]
    return t.engine.registry.footprint_source(e), t.engine.registry.footprint_bytes(e)


def _estimated_bytes(t: Running) -> bool:
    e = t.engine.registry.entries[EMBED]
    return t.engine.registry.footprint_bytes(e) == e.size_bytes * 1.5


APPLIED: dict[str, Probe] = {
    "server.max_model_name_chars": status("POST", "/v1/chat/completions", KEY_B, 400,
                                          **chat("m" * 41)),
    "server.body_timeout_s": value(lambda t: t.app[CONFIG].current.server.body_timeout_s, 7),
    "server.stall_timeout_s": value(lambda t: t.app[INFLIGHT].stall_timeout_s, 3),
    # Read by each streaming request as it starts (server/progress.py).
    "server.loading_progress": value(
        lambda t: t.app[CONFIG].current.server.loading_progress, "content"),
    "server.loading_progress_interval_s": value(
        lambda t: t.app[CONFIG].current.server.loading_progress_interval_s, 0.5),
    # Read by every request (server/browser.py): a 421 and a 403 before the reload.
    "server.allowed_hosts": status("GET", "/v1/models", KEY_B, 200,
                                   headers={"Host": "proxy.lan:8080"}),
    "server.allowed_origins": status("POST", "/v1/chat/completions", KEY_B, 200,
                                     headers={"Origin": "http://localhost:3000"}, **chat(MODEL)),
    "memory.max_memory_usage_percent": value(
        lambda t: (t.engine.monitor.gauge.max_usage_percent,
                   t.engine.monitor.max_usage_fraction), (60, 0.6)),
    "memory.min_free_memory_gb": value(
        lambda t: (t.engine.monitor.gauge.min_free_bytes, t.engine.monitor.min_free_bytes),
        (1e9, 1e9)),
    "memory.monitoring_interval": value(lambda t: t.engine.config.memory.monitoring_interval, 5),
    "memory.budget_gb": value(lambda t: t.engine.sampler.sample().total_bytes, 32e9),
    "memory.footprint_factor": value(_estimated_bytes, True),
    "memory.reclaim_timeout_s": value(
        lambda t: t.engine.evictor.config.memory.reclaim_timeout_s, 2),
    "eviction.policy": value(lambda t: t.engine.report()["policy"], "lru"),
    "eviction.model_timeout_hours": value(lambda t: t.engine.registry.ttl_s(EMBED), 3600),
    "eviction.hold": value(lambda t: t.engine.evictor.hold_s(), 0.0),
    "eviction.queue_timeout_s": value(
        lambda t: t.engine.scheduler.config.eviction.queue_timeout_s, 7),
    "eviction.fairness_s": value(lambda t: t.engine.scheduler.config.eviction.fairness_s, 9),
    "eviction.manage_external": value(lambda t: t.engine.config.eviction.manage_external, True),
    "models.*.priority": row_field("priority", 8),
    "models.*.pinned": row_field("pinned", True),
    "models.*.ttl_s": row_field("ttl_s", 600),
    "models.*.aliases": _alias_retrieved,
    "models.*.footprint_gb": value(_footprint, ("configured", 3e9)),
    "models.*.load": _loaded_with_options,
    "models.*.fit.min_context_length": value(
        lambda t: t.engine.scheduler.fit.floor(t.engine.registry.entries[MODEL]), 1024),
    # A fleet reads both at each placement (a single server has nothing to place).
    "models.*.host": value(lambda t: t.app[CONFIG].current.models[MODEL].host, "h1"),
    "placement.replicate_after_waiters": value(
        lambda t: t.app[CONFIG].current.placement.replicate_after_waiters, 3),
    "tasks": _auto_routes,
    # The model's row as the engine's group index has it (aliases resolved).
    **{f"groups[].{name}": row_field("groups", [{"name": "pair", "policy": "exclusive",
                                                "members": [MODEL, "other/model"]}])
       for name in ("name", "members", "policy")},
    "preload.enabled": value(lambda t: t.engine.preloader.config.enabled, False),
    "preload.min_probability": value(lambda t: t.engine.preloader.config.min_probability, 0.9),
    "preload.rhythm_min_rate": value(lambda t: t.engine.preloader.config.rhythm_min_rate, 2),
    **{f"health.{name}": value(lambda t, name=name: getattr(t.app[HEALTH].config, name), v)
       for name, v in {"interval_s": 5, "error_rate_threshold": 0.9, "error_window_s": 120,
                       "min_requests": 9, "latency_regression_factor": 3,
                       "latency_window_s": 60, "hang_threshold_s": 9,
                       "probe_interval_s": 9}.items()},
    "health.webhook_url": _webhook_delivers,
    "health.webhook_timeout_s": value(lambda t: t.app[HEALTH].sink.settings().webhook_timeout_s,
                                      2),
    "health.webhook_max_attempts": value(
        lambda t: t.app[HEALTH].sink.settings().webhook_max_attempts, 2),
    "logging.level": value(lambda t: logging.getLogger().level, logging.ERROR),
    # Read when a websocket opens, and by each eviction decision.
    "native.max_frame_bytes": value(lambda t: t.app[CONFIG].current.native.max_frame_bytes,
                                    4096),
    "native.evict": value(lambda t: t.engine.evictor.config.native.evict, "always"),
    "metrics.inference_gateway": _gateway_series_exposed,
    "compat.embeddings_base64": _embedding_kept_as_floats,
    "compat.embedding_usage": value(lambda t: t.app[COMPAT].config.embedding_usage, False),
    "auth.keys[].name": _counted_by_name,
    "auth.keys[].key": status("POST", "/v1/chat/completions", KEY_A, 401, **chat(MODEL)),
    "auth.keys[].key_sha256": status("POST", "/v1/chat/completions", KEY_B, 200, **chat(MODEL)),
    "auth.keys[].key_env": status("POST", "/v1/chat/completions", KEY_C, 200, **chat(MODEL)),
    "auth.keys[].models": status("POST", "/v1/chat/completions", KEY_B, 403, **chat(EMBED)),
    "auth.admin_token": status("GET", "/proxy/stats", ADMIN_OLD, 401),
    "auth.admin_token_env": status("GET", "/proxy/stats", ADMIN_NEW, 200),
    "auth.read_only_access": status("GET", "/proxy/stats", KEY_B, 403),
    "auth.metrics_access": status("GET", "/metrics", None, 401),
}


def test_every_key_is_classified_and_changed_by_the_test(tmp_path):
    """A key added to the schema fails here until it is either start-only (reload.py) or
    given a probe above, and a value in changed_raw."""
    keys = [k for k in leaf_keys() if not single_choice(k)]
    base = load_config(base_raw("http://127.0.0.1:1"))
    new = load_config(changed_raw("http://127.0.0.1:2/hook", tmp_path))
    restart = set(start_only_paths(base))
    assert not restart & set(APPLIED), "a key cannot be both applied and start-only"
    assert [k for k in keys if k not in restart and k.split("[]")[0] not in restart
            and k not in APPLIED] == []
    assert [k for k in keys if value_at(base, k) == value_at(new, k)] == []
    assert set(APPLIED) <= set(keys)


@pytest.fixture
async def hook_server() -> Any:
    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)
    app = web.Application()
    app.router.add_post("/hook", hook)
    served = await serve(app)
    yield f"{served.url}/hook", received
    await served.close()


@pytest.fixture
async def from_file(tmp_path):
    """A proxy that reads its configuration the way `python -m proxy --config FILE` does, and
    reloads on a real SIGHUP to this process; `hup(raw)` writes the file and signals."""
    path = tmp_path / "proxy.yaml"
    args = build_parser().parse_args(["--config", str(path)])
    served: list[Proxy] = []
    loop = asyncio.get_running_loop()
    root_level = logging.getLogger().level

    async def start(raw: dict) -> Proxy:
        path.write_text(yaml.safe_dump(raw))
        app = create_app(resolve_config(args, ENV),
                         config_source=lambda: resolve_config(args, ENV))
        proxy = Proxy(await serve(app), app)
        served.append(proxy)
        loop.add_signal_handler(signal.SIGHUP, _reload_on_signal, app, app[RELOADER])
        return proxy

    async def hup(proxy: Proxy, raw: dict) -> None:
        path.write_text(yaml.safe_dump(raw))
        swapped = asyncio.Event()
        proxy.app[CONFIG].on_swap(lambda old, new: swapped.set())
        os.kill(os.getpid(), signal.SIGHUP)   # handled on this loop, as in the CLI
        async with asyncio.timeout(5):
            await swapped.wait()
    yield start, hup
    loop.remove_signal_handler(signal.SIGHUP)
    logging.getLogger().setLevel(root_level)
    for p in served:
        await p.served.close()


async def test_sighup_changing_every_key_applies_it_or_reports_a_restart(
        from_file, emulator, http, hook_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="proxy.reload")
    start, hup = from_file
    hook_url, received = hook_server
    proxy = await start(base_raw(emulator.url))
    before = proxy.app[CONFIG].current
    await hup(proxy, changed_raw(hook_url, tmp_path))
    (line,) = [r.getMessage() for r in caplog.records if "configuration reloaded" in
               r.getMessage()]
    running = Running(proxy, http, emulator, received)
    failed = []
    for key in leaf_keys():
        if single_choice(key):
            continue
        if key.split("[]")[0] in start_only_paths(before):   # a list: compared whole
            key = key.split("[]")[0]
            # Reported, and the running value stays the one everything reads.
            if f"{key} (" not in line and not (key.endswith("token") and key in line):
                failed.append(f"{key}: not reported as needing a restart")
            elif value_at(proxy.app[CONFIG].current, key) != value_at(before, key):
                failed.append(f"{key}: reported, but the holder took the new value")
        elif not await APPLIED[key](running):
            failed.append(f"{key}: not in force after the reload")
    assert failed == []
    assert sum(emulator.state.unload_calls.values()) == 0


# -- the two reload bugs, each on its own ----------------------------------------------------------
async def test_an_alias_added_by_sighup_is_found_by_models_retrieve(from_file, emulator, http):
    start, hup = from_file
    raw = base_raw(emulator.url)
    proxy = await start(raw)
    raw["models"][MODEL]["aliases"] = ["fast"]
    await hup(proxy, raw)
    async with http.get(f"{proxy.url}/v1/models/fast", headers=bearer(KEY_A)) as r:
        assert r.status == 200 and (await r.json())["id"] == MODEL


async def test_a_compat_switch_changed_by_sighup_takes_effect(from_file, emulator, http, caplog):
    caplog.set_level(logging.INFO, logger="proxy.reload")
    start, hup = from_file
    raw = base_raw(emulator.url)
    proxy = await start(raw)
    raw["compat"] = {"embeddings_base64": False}
    await hup(proxy, raw)
    assert any(r.getMessage() == "configuration reloaded; changed: compat.embeddings_base64 "
               "(True → False)" for r in caplog.records)
    async with http.post(f"{proxy.url}/v1/embeddings", headers=bearer(KEY_A), json={
            "model": EMBED, "input": "x", "encoding_format": "base64"}) as r:
        assert isinstance((await r.json())["data"][0]["embedding"], list)   # not repaired


# -- start-only keys: reported until the restart, never half-applied -------------------------------
async def test_a_pending_restart_is_reported_again_and_never_read(from_file, emulator, caplog):
    caplog.set_level(logging.INFO, logger="proxy.reload")
    start, hup = from_file
    raw = base_raw(emulator.url)
    proxy = await start(raw)
    raw["upstream"]["url"] = "http://127.0.0.1:9"
    await hup(proxy, raw)
    raw["models"][MODEL]["priority"] = 9
    await hup(proxy, raw)
    lines = [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage()]
    assert len(lines) == 2 and all("upstream.url" in ln for ln in lines)
    live = proxy.app[CONFIG].current
    assert live.upstream.url == emulator.url and live.model(MODEL).priority == 9


async def test_a_reload_that_would_expose_the_running_host_is_rejected(make_proxy, emulator,
                                                                       http):
    running = load_config({**base_raw(emulator.url), "server": {"host": "0.0.0.0"}})
    exposed_later = load_config({**base_raw(emulator.url), "auth": {}})   # loopback, no keys
    proxy = await make_proxy(emulator.url, config=running,
                             app_kwargs={"config_source": lambda: exposed_later})
    result = proxy.app[RELOADER].reload(proxy.app)
    assert result["reloaded"] is False
    assert "server.host: 0.0.0.0 is reachable" in result["problems"][0]
    assert proxy.app[CONFIG].current is running
    async with http.post(f"{proxy.url}/v1/chat/completions", **chat(MODEL)) as r:
        assert r.status == 401                  # the keys stay


# -- the holder itself ---------------------------------------------------------------------------
def test_a_view_that_cannot_be_built_leaves_the_old_config_and_views():
    live = LiveConfig(load_config({"models": {MODEL: {"aliases": ["fast"]}}}))
    before = live.current

    def ring(c: Config) -> int:
        if c.model(MODEL).priority == 9:
            raise ConfigError(["auth: cannot build"])
        return c.model(MODEL).priority
    view = live.derive(ring)
    with pytest.raises(ConfigError):
        live.swap(load_config({"models": {MODEL: {"priority": 9}}}))
    assert live.current is before and live.aliases == {"fast": MODEL} and view.value == 5
    live.swap(load_config({"models": {MODEL: {"priority": 7}}}))
    assert live.aliases == {} and view.value == 7


def test_the_app_and_its_engine_share_one_holder(emulator):
    app = create_app(load_config(base_raw(emulator.url)))
    assert app[ENGINE].live is app[CONFIG] and app[ENGINE].config is app[CONFIG].current


def test_a_part_that_fails_to_apply_a_swap_leaves_the_others_applied(caplog):
    live = LiveConfig(load_config({}))
    applied: list[int] = []

    def broken(old: Config, new: Config) -> None:
        raise RuntimeError("a part's bug")
    live.on_swap(broken)
    live.on_swap(lambda old, new: applied.append(new.model(MODEL).priority))
    new = load_config({"models": {MODEL: {"priority": 7}}})
    with caplog.at_level(logging.ERROR, logger="proxy.config"):
        assert live.swap(new) is not new
    assert live.current is new and applied == [7]
    assert "applying the new configuration failed" in caplog.text
