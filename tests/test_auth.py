"""Client keys, the admin token and what each may reach; secrets never leak upstream."""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from proxy.cli import build_parser, main, resolve_config
from proxy.emulator import EmulatorOptions
from proxy.errors import ConfigError
from proxy.server.keys import AUTH as AUTH_STATE
from proxy.upstream.lmstudio import LMStudioUpstream

from .conftest import FIXED_CREATED_S, proxy_config

MODEL = "qwen/qwen3-4b"
OTHER = "google/gemma-3-12b"
ALICE, BOB, ADMIN = "sk-alice-0123456789", "sk-bob-0123456789", "admin-0123456789"
KEYS = [{"name": "alice", "key": ALICE},
        {"name": "bob", "key_sha256": hashlib.sha256(BOB.encode()).hexdigest(),
         "models": ["fast"]}]
AUTH = {"auth.keys": KEYS, "auth.admin_token": ADMIN,
        "models": {MODEL: {"aliases": ["fast"]}}}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ADMIN_ACTIONS = [("/proxy/models/load", {"model": MODEL}), ("/proxy/models/unload",
                 {"model": MODEL}), ("/proxy/optimize", None), ("/proxy/clear", None)]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
async def guarded(make_proxy, emulator):
    return await make_proxy(emulator.url, **AUTH)


async def test_inference_needs_a_valid_key(guarded, emulator, http):
    url = f"{guarded.url}/v1/chat/completions"
    async with http.post(url, json=CHAT) as missing, \
            http.post(url, json=CHAT, headers=bearer("sk-wrong")) as wrong:
        assert missing.status == wrong.status == 401
        assert (await wrong.json())["error"]["code"] == "invalid_api_key"
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert sum(emulator.state.inference_calls.values()) == 0
    async with http.post(url, json=CHAT, headers=bearer(ALICE)) as ok, \
            http.post(url, json=CHAT, headers={"Authorization": f"bearer {ALICE}"}) as lower, \
            http.post(url, json=CHAT, headers={"x-api-key": ALICE}) as ok_anthropic_style:
        assert ok.status == lower.status == ok_anthropic_style.status == 200


async def test_the_openai_sdk_sees_an_authentication_error(guarded):
    client = openai.AsyncOpenAI(base_url=f"{guarded.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(**CHAT)
    await client.close()
    client = openai.AsyncOpenAI(base_url=f"{guarded.url}/v1", api_key=ALICE, max_retries=0)
    assert (await client.chat.completions.create(**CHAT)).model == MODEL
    await client.close()


@pytest.mark.parametrize("path,body", ADMIN_ACTIONS)
async def test_every_admin_action_needs_the_admin_token(guarded, emulator, http, path, body):
    async with http.post(guarded.url + path, json=body) as none, \
            http.post(guarded.url + path, json=body, headers=bearer(ALICE)) as client_key:
        assert none.status == 401
        assert client_key.status == 403
        assert (await client_key.json())["error"]["code"] == "admin_required"
    assert sum(emulator.state.load_calls.values()) == 0
    async with http.post(guarded.url + path, json=body, headers=bearer(ADMIN)) as admin:
        assert admin.status == 200


async def test_admin_actions_are_refused_when_no_admin_token_is_configured(make_proxy, emulator,
                                                                            http):
    proxy = await make_proxy(emulator.url, **{"auth.keys": KEYS})
    async with http.post(f"{proxy.url}/proxy/clear", headers=bearer(ALICE)) as resp:
        assert resp.status == 403 and "no auth.admin_token" in (await resp.json())[
            "error"]["message"]


async def test_a_key_limited_to_models_cannot_use_others(guarded, emulator, http):
    url = f"{guarded.url}/v1/chat/completions"
    async with http.post(url, json={**CHAT, "model": OTHER}, headers=bearer(BOB)) as other:
        error = (await other.json())["error"]
        assert other.status == 403 and error["code"] == "model_not_allowed"
        assert error["param"] == "model"
    assert emulator.state.load_calls[OTHER] == 0 and emulator.state.inference_calls[OTHER] == 0
    async with http.post(url, json={**CHAT, "model": "fast"}, headers=bearer(BOB)) as alias, \
            http.post(url, json=CHAT, headers=bearer(BOB)) as by_key:
        assert alias.status == by_key.status == 200


async def test_auto_picks_among_the_models_a_limited_key_may_use(make_proxy, emulator, http):
    """Both models loaded, the task's config prefers OTHER: the unlimited key gets it, the key
    limited to `fast` gets its own model instead of a 403."""
    proxy = await make_proxy(emulator.url, **AUTH, **{"tasks.chat": [OTHER, MODEL]})
    url = f"{proxy.url}/v1/chat/completions"
    for model in (MODEL, OTHER):
        async with http.post(url, json={**CHAT, "model": model}, headers=bearer(ALICE)) as r:
            assert r.status == 200
    auto = {**CHAT, "model": "auto:chat"}
    async with http.post(url, json=auto, headers=bearer(ALICE)) as alice, \
            http.post(url, json=auto, headers=bearer(BOB)) as bob:
        assert alice.status == bob.status == 200
        assert alice.headers["X-Proxy-Model"] == OTHER and bob.headers["X-Proxy-Model"] == MODEL
        assert (await bob.json())["model"] == MODEL
    assert emulator.state.inference_calls[OTHER] == 2     # alice's two, none of bob's


async def test_auto_with_no_model_the_key_may_use_is_a_clear_403(make_proxy, emulator, http):
    embed = "text-embedding-nomic-embed-text-v1.5"
    keys = [{"name": "carol", "key": ALICE, "models": [embed]}]
    proxy = await make_proxy(emulator.url, **{"auth.keys": keys})
    async with http.post(f"{proxy.url}/v1/chat/completions", json={**CHAT, "model": "auto"},
                         headers=bearer(ALICE)) as r:
        error = (await r.json())["error"]
    assert r.status == 403 and error["code"] == "model_not_allowed" and error["param"] == "model"
    assert error["message"] == "This API key ('carol') may use no LLM for the task 'chat'."
    assert sum(emulator.state.load_calls.values()) == 0
    async with http.post(f"{proxy.url}/v1/embeddings", json={"model": "auto", "input": "hi"},
                         headers=bearer(ALICE)) as r:
        assert r.status == 200 and r.headers["X-Proxy-Model"] == embed


async def test_a_wrong_key_never_reaches_lm_studio_with_the_upstream_token(make_emulator,
                                                                           make_proxy, http):
    emulator = await make_emulator(options=EmulatorOptions(api_token="lm-secret",
                                                           created_s=FIXED_CREATED_S))
    proxy = await make_proxy(emulator.url, **AUTH, **{"upstream.api_token": "lm-secret"})
    url = f"{proxy.url}/v1/chat/completions"
    for headers in ({}, bearer("sk-wrong"), bearer("lm-secret"), {"x-api-key": "sk-wrong"}):
        async with http.post(url, json=CHAT, headers=headers) as resp:
            assert resp.status == 401 and (await resp.json())["error"]["code"] == \
                "invalid_api_key"
    assert sum(emulator.state.inference_calls.values()) == 0
    async with http.post(url, json=CHAT, headers=bearer(ALICE)) as resp:
        assert resp.status == 200    # the emulator checked the upstream token


class RecordingUpstream:
    """An Upstream that forwards to LM Studio and keeps the headers of each request."""

    def __init__(self, inner: LMStudioUpstream) -> None:
        self.inner = inner
        self.base_url = inner.base_url
        self.sent_headers: list[dict[str, str]] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def request(self, method, path, headers, body):
        self.sent_headers.append({k.lower(): v for k, v in headers.items()})
        return self.inner.request(method, path, headers, body)


async def test_an_accepted_client_key_is_not_forwarded_upstream(make_proxy, emulator, http):
    config = proxy_config(emulator.url, **{"auth.keys": KEYS})
    upstream = RecordingUpstream(LMStudioUpstream(config.upstream))
    proxy = await make_proxy(emulator.url, config=config, app_kwargs={"upstream": upstream})
    own_call = proxy.app[AUTH_STATE].own_call_headers()     # the proxy's own mark, too
    for headers in (bearer(ALICE), {"x-api-key": ALICE}, {**bearer(ALICE), **own_call}):
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                             headers=headers) as resp:
            assert resp.status == 200
    assert len(upstream.sent_headers) == 3
    assert not any({"authorization", "x-api-key", "x-proxy-own-call"} & set(h)
                   for h in upstream.sent_headers)


async def test_read_only_endpoints_and_metrics_follow_their_settings(make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **AUTH, **{"auth.metrics_access": "admin"})
    async with http.get(f"{proxy.url}/proxy/stats") as anon, \
            http.get(f"{proxy.url}/proxy/stats", headers=bearer(BOB)) as keyed, \
            http.get(f"{proxy.url}/metrics", headers=bearer(ALICE)) as metrics_key, \
            http.get(f"{proxy.url}/metrics", headers=bearer(ADMIN)) as metrics_admin, \
            http.get(f"{proxy.url}/healthz") as probe, http.get(f"{proxy.url}/readyz") as ready:
        assert (anon.status, keyed.status) == (401, 200)
        assert (metrics_key.status, metrics_admin.status) == (403, 200)
        assert probe.status == ready.status == 200
    opened = await make_proxy(emulator.url, **AUTH, **{"auth.read_only_access": "open"})
    async with http.get(f"{opened.url}/proxy/models") as resp:
        assert resp.status == 200


async def test_requests_are_counted_per_key_name(guarded, http):
    for secret in (ALICE, ALICE, BOB, "sk-wrong"):
        async with http.post(f"{guarded.url}/v1/chat/completions", json=CHAT,
                             headers=bearer(secret)) as resp:
            await resp.read()
    async with http.get(f"{guarded.url}/proxy/stats", headers=bearer(ADMIN)) as resp:
        auth = (await resp.json())["auth"]
    assert auth["requests_by_key"] == {"alice": 2, "bob": 1, "admin": 1}
    assert auth["rejected"] == {"invalid_key": 1}
    async with http.get(f"{guarded.url}/metrics") as resp:   # metrics_access: open
        text = await resp.text()
    assert "alice" not in text and "proxy_requests_by_key" not in text
    assert 'proxy_auth_rejections_total{reason="invalid_key"} 1.0' in text


@pytest.mark.parametrize("access", ["key", "admin"])
async def test_metrics_name_the_keys_only_when_they_need_a_credential(make_proxy, emulator,
                                                                      http, access):
    proxy = await make_proxy(emulator.url, **AUTH, **{"auth.metrics_access": access})
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                         headers=bearer(ALICE)) as resp:
        assert resp.status == 200
    async with http.get(f"{proxy.url}/metrics", headers=bearer(ADMIN)) as resp:
        text = await resp.text()
    assert 'proxy_requests_by_key_total{key="alice"} 1.0' in text


def _resolve(argv: list[str], environ: dict[str, str], tmp_path, auth: str):
    path = tmp_path / "proxy.yaml"
    path.write_text(auth)
    return resolve_config(build_parser().parse_args(["--config", str(path), *argv]), environ)


def test_keys_and_admin_token_can_come_from_the_environment(tmp_path):
    yaml = ("auth:\n  keys: [{name: ci, key_env: CI_KEY}]\n"
            "  admin_token_env: ADMIN_TOKEN\n")
    config = _resolve([], {"CI_KEY": "sk-ci", "ADMIN_TOKEN": "adm"}, tmp_path, yaml)
    (key,) = config.auth.keys
    assert key.key_sha256 == hashlib.sha256(b"sk-ci").hexdigest() and key.key_env is None
    assert config.auth.admin_token == "adm"
    with pytest.raises(ConfigError) as err:
        _resolve([], {}, tmp_path, yaml)
    assert len(err.value.problems) == 2 and "CI_KEY is not set" in err.value.problems[0]


def test_key_entries_are_validated_with_their_paths(tmp_path):
    yaml = ("auth:\n  keys:\n    - {name: a, key: x, key_env: X}\n    - {name: a, key_sha256: ab}\n"
            "    - {key: y, models: []}\n")
    with pytest.raises(ConfigError) as err:
        _resolve([], {"X": "1"}, tmp_path, yaml)
    text = "\n".join(err.value.problems)
    for expected in ("auth.keys[0]: needs exactly one of", "auth.keys[1].name: 'a' is used",
                     "auth.keys[1].key_sha256: must be 64 hex", "auth.keys[2].name: required",
                     "auth.keys[2].models: empty list"):
        assert expected in text


def test_a_non_loopback_host_without_keys_refuses_to_start(capsys):
    assert main(["--host", "0.0.0.0", "--check"], environ={}) == 2
    assert "auth.keys is empty" in capsys.readouterr().err
    assert main(["--host", "0.0.0.0", "--check"],
                environ={"PROXY_CONFIG": "/dev/null"}) == 2


def test_allow_unauthenticated_starts_with_a_warning(tmp_path, capsys):
    path = tmp_path / "proxy.yaml"
    path.write_text("server: {host: 0.0.0.0, allow_unauthenticated: true}\n")
    assert main(["--config", str(path), "--check"], environ={}) == 0
    out = capsys.readouterr().out
    assert "warning: server.host: 0.0.0.0 is reachable" in out
    assert "warning: server.allowed_hosts is empty" in out and "DNS rebinding" in out
    path.write_text("server: {host: 0.0.0.0, allow_unauthenticated: true, "
                    "allowed_hosts: [proxy.lan]}\n")
    assert main(["--config", str(path), "--check"], environ={}) == 0
    assert "allowed_hosts" not in capsys.readouterr().out
    path.write_text("server: {host: 0.0.0.0}\nauth: {keys: [{name: a, key: sk-a}]}\n")
    assert main(["--config", str(path), "--check"], environ={}) == 0


def test_a_key_env_that_was_never_read_is_an_error_not_a_dead_key():
    from proxy.app import create_app
    config = proxy_config("http://127.0.0.1:1", **{"auth.keys": [{"name": "a",
                                                                   "key_env": "A_KEY"}]})
    with pytest.raises(ConfigError, match="key_env: not read yet"):
        create_app(config)


async def test_the_status_command_sends_its_key(guarded, capsys):
    import asyncio
    argv = ["status", "--url", guarded.url]
    assert await asyncio.to_thread(main, argv, {}) == 1
    assert "401" in capsys.readouterr().out
    assert await asyncio.to_thread(main, argv, {"PROXY_API_KEY": ALICE}) == 0
    assert "pressure" in capsys.readouterr().out


async def test_an_admin_token_alone_guards_admin_actions_and_leaves_clients_anonymous(
        make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **{"auth.admin_token": ADMIN})
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as client, \
            http.get(f"{proxy.url}/proxy/stats") as read_only, \
            http.post(f"{proxy.url}/proxy/optimize") as admin:
        assert (client.status, read_only.status, admin.status) == (200, 200, 401)


def test_check_warns_when_the_upstream_token_is_open_to_every_local_client(tmp_path, capsys):
    path = tmp_path / "proxy.yaml"
    path.write_text("upstream: {api_token: lm-secret}\n")
    assert main(["--config", str(path), "--check"], environ={}) == 0
    assert "warning: upstream.api_token is set and auth.keys is empty" in capsys.readouterr().out


def test_no_client_key_may_be_named_admin(tmp_path):
    with pytest.raises(ConfigError, match="'admin' is the admin token's label"):
        _resolve([], {}, tmp_path, "auth:\n  keys: [{name: admin, key: sk-x}]\n")


async def test_being_labelled_admin_is_not_being_admin(guarded, http):
    import dataclasses
    from proxy.server.keys import AUTH as AUTH_STATE
    ring = guarded.app[AUTH_STATE].ring
    # A client key that carries the admin label anyway (a config built without validation).
    ring.keys = tuple(dataclasses.replace(k, name="admin") for k in ring.keys)
    async with http.post(f"{guarded.url}/proxy/clear", headers=bearer(ALICE)) as resp:
        assert resp.status == 403


async def test_a_limited_key_lists_only_its_models(guarded, http):
    async with http.get(f"{guarded.url}/v1/models", headers=bearer(BOB)) as limited, \
            http.get(f"{guarded.url}/v1/models", headers=bearer(ALICE)) as full:
        assert [m["id"] for m in (await limited.json())["data"]] == [MODEL]
        assert len((await full.json())["data"]) > 1


@pytest.mark.parametrize("header", [b"Authorization: Bearer sk-\xff\xfe", b"X-Api-Key: \xe2\x82",
                                    b"x-api-key: sk-alice-\x80"])
async def test_a_credential_that_is_not_utf8_is_a_401(guarded, emulator, caplog, header):
    from .test_hostile import raw_request
    status, rest = await raw_request(guarded.url, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
                                     header + b"\r\nConnection: close\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 401")
    error = orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


EMBED = "text-embedding-nomic-embed-text-v1.5"
FORWARDED = [("POST", "/v1/chat/completions", CHAT),
             ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
             ("POST", "/v1/embeddings", {"model": EMBED, "input": "hi"}),
             ("POST", "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 2}),
             ("POST", "/v1/messages", {"model": MODEL, "max_tokens": 2, "messages": [
                 {"role": "user", "content": "hi"}]}),
             ("GET", "/v1/models", None), ("GET", f"/v1/models/{MODEL}", None),
             ("GET", "/lmstudio-greeting", None)]


async def recording_emulator(api_token: str | None) -> tuple[Any, list[tuple[str, Any]]]:
    """LM Studio's emulator behind a middleware that records every request's headers as
    they arrived on its socket."""
    from proxy.emulator import GB, EmulatorState, create_emulator_app, load_catalog
    from proxy.server.serving import serve
    seen: list[tuple[str, Any]] = []

    @web.middleware
    async def record(request, handler):
        seen.append((request.path, request.headers.copy()))
        return await handler(request)
    app = create_emulator_app(EmulatorState(load_catalog(), capacity_bytes=64 * GB),
                              EmulatorOptions(api_token=api_token, created_s=FIXED_CREATED_S))
    app.middlewares.insert(0, record)
    return await serve(app), seen


@pytest.mark.parametrize("with_keys,api_token", [(True, "lm-secret"), (False, "lm-secret"),
                                                 (True, None), (False, None)])
async def test_no_client_credential_reaches_the_upstream_on_any_route(make_proxy, http,
                                                                       with_keys, api_token):
    upstream, seen = await recording_emulator(api_token)
    try:
        settings = {**AUTH} if with_keys else {}
        if api_token:
            settings["upstream.api_token"] = api_token
        proxy = await make_proxy(upstream.url, **settings)
        sent = {"Authorization": f"Bearer {ALICE}", "X-Api-Key": ALICE,
                "Cookie": "session=client-cookie"}
        for method, path, body in FORWARDED:
            seen.clear()
            async with http.request(method, proxy.url + path, json=body, headers=sent) as r:
                assert r.status == 200, (path, await r.text())
            arrived = [h for p, h in seen if p == path.replace(f"/{MODEL}", "")]
            assert arrived, path
            for headers in arrived:
                assert "X-Api-Key" not in headers and "Cookie" not in headers, path
                assert headers.get("Authorization") == (f"Bearer {api_token}" if api_token
                                                        else None), path
        seen.clear()
        async with http.ws_connect(f"{proxy.url}/llm", headers=sent):
            pass
        (upgrade,) = [h for p, h in seen if p == "/llm"]
        assert not {"Authorization", "X-Api-Key", "Cookie"} & set(upgrade)
    finally:
        await upstream.close()


async def test_models_retrieve_follows_the_keys_model_scope(guarded, http):
    async with http.get(f"{guarded.url}/v1/models/{OTHER}", headers=bearer(BOB)) as other:
        assert other.status == 403
        assert (await other.json())["error"]["code"] == "model_not_allowed"
    for allowed in (MODEL, "fast"):
        async with http.get(f"{guarded.url}/v1/models/{allowed}", headers=bearer(BOB)) as r:
            assert r.status == 200 and (await r.json())["id"] == MODEL
    async with http.get(f"{guarded.url}/v1/models/{OTHER}", headers=bearer(ALICE)) as r:
        assert r.status == 200


def test_upstream_url_credentials_with_a_token_are_refused_alike_by_check_and_start(tmp_path,
                                                                                   capsys):
    path = tmp_path / "proxy.yaml"
    path.write_text("upstream: {url: 'http://user:pw-secret@127.0.0.1:1234', "
                    "api_token: lm-secret}\n")
    errors = []
    for argv in (["--config", str(path), "--check"], ["--config", str(path)]):
        assert main(argv, {}) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1]
    assert "upstream.url: http://***@127.0.0.1:1234 carries credentials" in errors[0]
    assert "pw-secret" not in errors[0]


async def test_upstream_url_credentials_go_as_basic_auth_and_are_never_shown(make_proxy, http,
                                                                            caplog):
    import base64
    caplog.set_level(logging.DEBUG)
    upstream, seen = await recording_emulator(None)
    host = upstream.url.removeprefix("http://")
    proxy = await make_proxy(f"http://user:pw-secret@{host}")
    shown = []
    try:
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
        basic = "Basic " + base64.b64encode(b"user:pw-secret").decode()
        assert {h.get("Authorization") for _, h in seen} == {basic}   # managing and forwarding
        for path in ("/readyz", "/proxy/stats", "/proxy/health"):
            async with http.get(proxy.url + path) as r:
                shown.append(await r.text())
        assert "http://***@" in shown[0]
    finally:
        await upstream.close()
    await proxy.engine.reconcile()        # LM Studio is gone: every error names its URL
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/llm"),
                         ("GET", "/lmstudio-greeting"), ("GET", "/readyz")):
        async with http.request(method, proxy.url + path, json=CHAT) as r:
            assert r.status in (502, 503)
            shown.append(await r.text())
    assert not [s for s in shown if "pw-secret" in s] and "pw-secret" not in caplog.text


def test_a_reload_names_a_changed_upstream_url_without_its_credentials():
    from proxy.server.reload import restart_needed
    (change,) = restart_needed(proxy_config("http://u:pw-old@a:1"),
                               proxy_config("http://u:pw-new@b:1"))
    assert change == "upstream.url ('http://***@a:1' → 'http://***@b:1')"


async def test_upstream_url_credentials_are_not_written_to_the_history_database(
        make_proxy, emulator, http, tmp_path):
    """Footprints, ownership and history are filed under the upstream's URL: its shown form."""
    host = emulator.url.removeprefix("http://")
    path = tmp_path / "history.sqlite3"
    url = f"http://user:pw-secret@{host}"
    proxy = await make_proxy(url, config=proxy_config(
        url, storage={"enabled": True, "path": str(path)}))
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200
    await proxy.engine.flush()
    written = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"127.0.0.1" in written and b"pw-secret" not in written


async def test_a_key_refused_a_model_is_an_auth_rejection_not_a_failure_of_that_model(
        make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **AUTH, **{"health.min_requests": 3})
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=BOB, max_retries=0)
    for _ in range(6):
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(**{**CHAT, "model": OTHER})
    await client.close()
    usage = proxy.engine.usage(OTHER)
    assert (usage.requests, usage.failures) == (0, 0)
    async with http.get(f"{proxy.url}/proxy/health", headers=bearer(ADMIN)) as resp:
        health = await resp.json()
    assert health["status"] == "ok" and health["alerts"] == []
    async with http.get(f"{proxy.url}/proxy/stats", headers=bearer(ADMIN)) as resp:
        assert (await resp.json())["auth"]["rejected"] == {"model_not_allowed": 6}
    async with http.get(f"{proxy.url}/metrics") as resp:
        text = await resp.text()
    assert 'proxy_auth_rejections_total{reason="model_not_allowed"} 6.0' in text
    assert ('proxy_requests_total{endpoint="/v1/chat/completions",model="google/gemma-3-12b",'
            'outcome="refused"} 6.0') in text
    assert 'outcome="error"' not in text
