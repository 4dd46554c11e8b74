"""The app's resources: started in order, closed in reverse, and a failure while starting one
still closes those already started."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from proxy.app import RESOURCES, create_app
from proxy.upstream.base import ApiLevel, UpstreamModel

from .conftest import proxy_config


class BrokenListUpstream:
    """An Upstream whose model list fails with a bug (not an UpstreamError): the engine's
    start raises."""
    base_url = "http://127.0.0.1:9"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")

    async def close(self) -> None:
        self.calls.append("close")

    async def detect(self) -> ApiLevel:
        return ApiLevel.MANAGED

    async def list_models(self) -> list[UpstreamModel]:
        raise RuntimeError("a bug in the backend")

    async def load(self, key: str, options: Any) -> Any:
        raise AssertionError("never loads")

    async def unload(self, instance_id: str) -> None:
        raise AssertionError("never unloads")

    def request(self, *args: Any) -> Any:
        raise AssertionError("never forwards")


async def test_a_failed_start_still_closes_what_was_started_before_it():
    upstream = BrokenListUpstream()
    app = create_app(proxy_config(upstream.base_url), upstream=upstream)
    runner = web.AppRunner(app)
    with pytest.raises(RuntimeError, match="a bug in the backend"):
        await runner.setup()
    await runner.cleanup()
    assert upstream.calls.count("close") == 1 and upstream.calls[-1] == "close"
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("events-")]


def test_each_resource_has_a_context_of_its_own():
    assert len(RESOURCES) == len(set(RESOURCES)) >= 6
