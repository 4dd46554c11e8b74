"""A model no host of the fleet can take is refused at once with what to change: each host's
ceiling for one model and the settings that bound it, or the `models` patterns or catalogue
that keep it off that host."""
from __future__ import annotations

from typing import Any

import pytest

from proxy.configload import load_config
from proxy.emulator.catalog import CatalogModel
from .fakes import GB

pytestmark = pytest.mark.timeout(60)

SMALL, HUGE = "lab/small-2b", "lab/huge-14b"
CATALOG = [CatalogModel(key=SMALL, size_bytes=2 * GB, memory_bytes=2 * GB, load_time_s=0.0),
           CatalogModel(key=HUGE, size_bytes=12 * GB, memory_bytes=12 * GB, load_time_s=0.0)]


async def chat(http: Any, url: str, model: str) -> tuple[int, dict]:
    async with http.post(f"{url}/v1/chat/completions", json={
            "model": model, "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}) as r:
        return r.status, await r.json()


async def test_too_large_names_each_hosts_ceiling_setting_and_the_hosts_kept_off(
        make_emulator, make_proxy, http):
    """'fast' (40 GB) may hold only lab/small-*, 'slow' (16 GB, 80 %: 12.8 GB for one model)
    may hold it but not 14.4 GB, 'bare' does not list it."""
    fast, slow = await make_emulator(catalog=CATALOG), await make_emulator(catalog=CATALOG)
    bare = await make_emulator(catalog=CATALOG[:1])
    proxy = await make_proxy("", config=load_config({
        "upstreams": [{"name": "fast", "url": fast.url, "budget_gb": 40,
                       "models": ["lab/small-*"]},
                      {"name": "slow", "url": slow.url, "budget_gb": 16},
                      {"name": "bare", "url": bare.url, "budget_gb": 40}],
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 80},
        "storage": {"enabled": False}}))
    status, body = await chat(http, proxy.url, HUGE)
    assert status == 503 and body["error"]["code"] == "model_too_large"
    assert body["error"]["message"] == (
        f"'{HUGE}' needs 14.4 GB (estimated as its 12.0 GB file × memory.footprint_factor), "
        "more than any host of the fleet may give one model: 'fast' may not hold it "
        "(upstreams[0].models: lab/small-*); 'slow' 12.8 GB of 16.0 GB (change "
        "memory.max_memory_usage_percent or upstreams[1].budget_gb); 'bare' does not list it. "
        f"It can never be loaded here: change one of those, or set models.{HUGE}.footprint_gb "
        "if the estimate is wrong.")
    assert slow.state.load_calls[HUGE] == 0


async def test_hosts_that_measured_different_footprints_each_give_their_own(
        make_emulator, make_proxy, http):
    emus = [await make_emulator(catalog=CATALOG) for _ in range(2)]
    proxy = await make_proxy("", config=load_config({
        "upstreams": [{"name": n, "url": e.url, "budget_gb": 10}
                      for n, e in zip(("a", "b"), emus)],
        "memory": {"min_free_memory_gb": 1, "max_memory_usage_percent": 100},
        "storage": {"enabled": False}}))
    b = proxy.engine.by_name["b"]
    b.core.registry.entries[HUGE].learn_footprint(13 * GB)   # as if measured there
    status, body = await chat(http, proxy.url, HUGE)
    assert status == 503 and body["error"]["code"] == "model_too_large"
    assert body["error"]["message"] == (
        f"'{HUGE}' needs more than any host of the fleet may give one model: 'a' 9.0 GB of "
        "10.0 GB for its 14.4 GB (estimated as its 12.0 GB file × memory.footprint_factor; "
        "change memory.min_free_memory_gb or upstreams[0].budget_gb); 'b' 9.0 GB of 10.0 GB "
        "for its 13.0 GB (measured across earlier loads; change memory.min_free_memory_gb or "
        "upstreams[1].budget_gb). It can never be loaded here: change one of those, or set "
        f"models.{HUGE}.footprint_gb if the estimate is wrong.")
