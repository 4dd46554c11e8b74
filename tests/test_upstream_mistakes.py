"""A server of another kind than `upstream.kind`, said plainly: one that answers well enough
to relay to is named in the log and /readyz with the kind to set; one that does not is not
ready, with what it answered and what it looks like. Errors name the server by its kind."""
from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from proxy.config import UpstreamConfig
from proxy.configload import load_config
from proxy.emulator.catalog import GB, CatalogModel
from proxy.emulator.llamacpp import RouterEmulator, start_router_emulator
from proxy.emulator.ollama import VERSION as OLLAMA_VERSION, OllamaEmulator, \
    start_ollama_emulator
from proxy.errors import UpstreamError, UpstreamUnreachable
from proxy.upstream import create_upstream


ROUTER_CATALOG = [CatalogModel("chat-a", size_bytes=GB // 2, load_time_s=0.01),
                  CatalogModel("broken", size_bytes=GB // 10, load_time_s=0.01)]
SET_KIND = "for it (upstream.kind, or the host's under upstreams:)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[RouterEmulator]:
    emu = await start_router_emulator(ROUTER_CATALOG, models_max=0, autoload=False,
                                      models_dir=tmp_path)
    yield emu
    await emu.close()


@pytest.fixture
async def ollama() -> AsyncIterator[OllamaEmulator]:
    emu = await start_ollama_emulator([CatalogModel("llama3.2:latest", size_bytes=GB)])
    yield emu
    await emu.close()


async def readyz(http: Any, proxy: Any) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{proxy.url}/readyz") as resp:
        return resp.status, await resp.json()


# -- a server of another kind ----------------------------------------------------------------

async def test_the_default_kind_in_front_of_llamacpps_router_says_to_set_llamacpp(
        router, make_proxy, http, caplog):
    """kind left at lmstudio: LM Studio's /api answers 404 there and /v1/models works, which
    looked like an LM Studio older than 0.4 — ready, managing nothing."""
    caplog.set_level(logging.WARNING, "proxy.upstream")
    proxy = await make_proxy(router.url)
    status, ready = await readyz(http, proxy)
    hint = (f"{router.url} is not LM Studio: it looks like llama.cpp's llama-server (its model "
            f"list says owned_by llamacpp): set kind: llamacpp {SET_KIND}")
    assert status == 200 and ready["note"] == hint
    assert [r.getMessage() for r in caplog.records if r.name == "proxy.upstream"] == [hint]


async def test_the_default_kind_in_front_of_ollama_says_to_set_ollama(ollama, make_proxy,
                                                                      http):
    proxy = await make_proxy(ollama.url)
    status, ready = await readyz(http, proxy)
    assert status == 200 and ready["note"] == (
        f"{ollama.url} is not LM Studio: it looks like Ollama (GET /api/version answered "
        f"version {OLLAMA_VERSION}): set kind: ollama {SET_KIND}")


async def test_kind_openai_in_front_of_llamacpps_router_says_it_could_be_managed(
        router, make_proxy, http):
    proxy = await make_proxy(router.url, **{"upstream.kind": "openai"})
    status, ready = await readyz(http, proxy)
    assert status == 200 and ready["note"] == (
        f"{router.url} is not a plain OpenAI-compatible server: it looks like llama.cpp's "
        f"llama-server (its model list says owned_by llamacpp): set kind: llamacpp {SET_KIND}")


async def test_a_fleet_host_of_another_kind_has_the_note_in_its_readiness(router, make_proxy,
                                                                          http):
    config = load_config({"upstreams": [{"name": "box", "url": router.url}],
                          "storage": {"enabled": False}})
    proxy = await make_proxy(router.url, config=config)
    status, ready = await readyz(http, proxy)
    assert status == 200 and ready["hosts"]["box"]["note"].startswith(
        f"{router.url} is not LM Studio: it looks like llama.cpp's llama-server")


async def test_the_real_router_is_told_apart_from_lm_studio(llama_router, make_proxy, http):
    proxy = await make_proxy(llama_router.url)
    status, ready = await readyz(http, proxy)
    assert status == 200 and "set kind: llamacpp" in ready["note"], ready


async def test_llamacpp_in_front_of_ollama_names_what_answered_and_the_kind_to_set(
        ollama, make_proxy, http):
    proxy = await make_proxy(ollama.url, **{"upstream.kind": "llamacpp"})
    status, ready = await readyz(http, proxy)
    assert status == 503 and ready["error"] == (
        f"{ollama.url} does not look like llama.cpp's llama-server: GET /models answered 404 "
        f"(404 page not found); it looks like Ollama (GET /api/version answered version "
        f"{OLLAMA_VERSION}): set kind: ollama {SET_KIND}")


async def test_ollama_in_front_of_llamacpps_router_names_what_answered_and_the_kind_to_set(
        router, make_proxy, http):
    proxy = await make_proxy(router.url, **{"upstream.kind": "ollama"})
    status, ready = await readyz(http, proxy)
    assert status == 503 and ready["error"].startswith(
        f"{router.url} does not look like Ollama: GET /api/version answered 404")
    assert ready["error"].endswith(
        f"; it looks like llama.cpp's llama-server (its model list says owned_by llamacpp): "
        f"set kind: llamacpp {SET_KIND}")


async def test_llamacpp_in_front_of_lm_studio_says_its_200_was_not_a_model_list(
        emulator, make_proxy, http):
    """LM Studio answers an unknown route 200 with an error: that is not a model list."""
    proxy = await make_proxy(emulator.url, **{"upstream.kind": "llamacpp"})
    status, ready = await readyz(http, proxy)
    assert status == 503 and ready["error"] == (
        f"{emulator.url} does not look like llama.cpp's llama-server: GET /models answered "
        f"200 without a model list (Unexpected endpoint or method. (GET /models)); it looks "
        f"like LM Studio (GET /api/v1/models answered LM Studio's model list): set kind: "
        f"lmstudio {SET_KIND}")


async def test_lm_studio_under_a_wrong_path_is_not_said_to_have_answered_well(emulator):
    """It said `does not look like LM Studio (GET /v1/models answered 200)`: a 200 without a
    model list, reported as if it were one. (The config refuses such a URL now; a server
    behind a reverse proxy's wrong prefix answers the same.)"""
    backend = create_upstream(UpstreamConfig(url=f"{emulator.url}/v1"))
    await backend.start()
    try:
        with pytest.raises(UpstreamError) as info:
            await backend.detect()
    finally:
        await backend.close()
    assert info.value.message == (
        f"{emulator.url}/v1 does not look like LM Studio: GET /api/v1/models and /api/v0/models "
        f"gave no model list, and /v1/models answered 200 without one (Unexpected endpoint or "
        f"method. (GET /v1/v1/models)); check upstream.url (the server's address, without /v1) "
        f"and upstream.kind")


# -- errors name the server by its kind ------------------------------------------------------

@pytest.mark.parametrize("kind,name", [("lmstudio", "LM Studio"), ("llamacpp", "llama.cpp"),
                                       ("ollama", "Ollama"),
                                       ("openai", "the OpenAI-compatible server")])
async def test_an_unreachable_server_is_named_by_its_kind(make_proxy, http, kind, name):
    url = f"http://127.0.0.1:{free_port()}"
    proxy = await make_proxy(url, **{"upstream.kind": kind})
    status, ready = await readyz(http, proxy)
    assert status == 503 and ready["error"].startswith(f"cannot reach {name} at {url}: ")
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": "m", "messages": []}) as resp:
        error = (await resp.json())["error"]
    assert resp.status == 502 and error["message"].startswith(f"cannot reach {name} at {url}")
    # The forwarding transport (upstream.client: fast) says so too.
    backend = create_upstream(UpstreamConfig(kind=kind, url=url))
    await backend.start()
    try:
        with pytest.raises(UpstreamUnreachable) as info:
            async with backend.request("POST", "/v1/chat/completions", {}, b"{}"):
                pass
    finally:
        await backend.close()
    assert info.value.message.startswith(f"cannot reach {name} at {url}: ")


async def test_an_unreachable_fleet_host_is_named_by_its_kind(make_proxy, http, caplog):
    """... and the start's warning names no server of the fleet's: it named upstream.url's
    default, http://127.0.0.1:1234, which no host is."""
    caplog.set_level(logging.WARNING, "proxy.app")
    url = f"http://127.0.0.1:{free_port()}"
    config = load_config({"upstreams": [{"name": "pc", "kind": "ollama", "url": url}],
                          "storage": {"enabled": False}})
    proxy = await make_proxy(url, config=config)
    status, ready = await readyz(http, proxy)
    assert status == 503 and ready["hosts"]["pc"]["error"].startswith(
        f"cannot reach Ollama at {url}: ")
    (started,) = [r.getMessage() for r in caplog.records if r.name == "proxy.app"]
    assert started.startswith(f"no host reachable yet (pc: cannot reach Ollama at {url}")


def test_a_servers_words_in_a_message_are_one_clipped_line():
    from proxy.upstream.identify import answered
    said = answered(404, {"error": {"message": "not here\nINFO forged line" + "x" * 200}},
                    "a model list")
    assert "\n" not in said and said.startswith("404 (not here\\nINFO forged line")
    assert said.endswith("…)") and len(said) < 140
