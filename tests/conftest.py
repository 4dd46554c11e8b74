"""Shared fixtures: the LM Studio emulator and the proxy, each on a real loopback socket."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from proxy.app import create_app
from proxy.configload import load_config
from proxy.emulator import Emulator, EmulatorOptions, start_emulator
from proxy.engine.core import EngineCore
from proxy.server.keys import ENGINE
from proxy.server.serving import Served, serve
from tests.llama.fixtures import (llama_router, llama_server_binary,  # noqa: F401
                                  make_llama_router, tiny_models)

FIXED_CREATED_S = 1_760_000_000


@dataclass
class Proxy:
    served: Served
    app: Any

    @property
    def url(self) -> str:
        return self.served.url

    @property
    def engine(self) -> EngineCore:
        return self.app[ENGINE]


@pytest.fixture
async def make_emulator() -> AsyncIterator[Callable[..., Awaitable[Emulator]]]:
    started: list[Emulator] = []

    async def make(**kwargs: Any) -> Emulator:
        kwargs.setdefault("options", EmulatorOptions(created_s=FIXED_CREATED_S))
        emu = await start_emulator(**kwargs)
        started.append(emu)
        return emu

    yield make
    for emu in started:
        await emu.close()


@pytest.fixture
async def emulator(make_emulator: Callable[..., Awaitable[Emulator]]) -> Emulator:
    return await make_emulator()


def proxy_config(upstream_url: str, **overrides: Any) -> Any:
    raw: dict[str, Any] = {"upstream": {"url": upstream_url},
                           # The emulator's memory is an account: manage it as a budget.
                           "memory": {"sampler": "budget", "budget_gb": 64,
                                      "min_free_memory_gb": 0},
                           "eviction": {"hold": 0},
                           "storage": {"enabled": False}}
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return load_config(raw)


@pytest.fixture
def private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME in the test's own folder: the history a library manager keeps by default
    (storage.path's default, under ~/.local/state) starts empty there and stays there."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[..., Awaitable[Proxy]]]:
    started: list[Proxy] = []

    async def make(upstream_url: str, *, config: Any = None, app_kwargs: Any = None,
                   **overrides: Any) -> Proxy:
        app = create_app(config or proxy_config(upstream_url, **overrides), **(app_kwargs or {}))
        p = Proxy(await serve(app), app)
        started.append(p)
        return p

    yield make
    for p in started:
        await p.served.close()


@pytest.fixture
async def proxy(make_proxy: Callable[..., Awaitable[Proxy]], emulator: Emulator) -> Proxy:
    return await make_proxy(emulator.url)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
