"""An unload by hand in a fleet holds back the preloads of every host, not only of the hosts
that held the model: another host's history would otherwise load it there at its next tick."""
from __future__ import annotations

import pytest

from proxy.configload import load_config
from proxy.emulator.catalog import CatalogModel
from proxy.engine.clock import ManualClock
from .fakes import GB

pytestmark = pytest.mark.timeout(60)

SMALL = "lab/small-2b"
CATALOG = [CatalogModel(key=SMALL, size_bytes=2 * GB, memory_bytes=2 * GB, load_time_s=0.0)]


async def test_an_unload_by_hand_holds_back_the_preloads_of_every_host(make_emulator,
                                                                      make_proxy, http):
    emus = {n: await make_emulator(catalog=CATALOG) for n in ("a", "b")}
    proxy = await make_proxy("", app_kwargs={"clock": ManualClock()}, config=load_config({
        "upstreams": [{"name": n, "url": emus[n].url, "budget_gb": 20} for n in emus],
        "storage": {"enabled": False},
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100}}))
    await proxy.engine.load(SMALL, host="a")
    entries = {n: proxy.engine.by_name[n].core.registry.entries[SMALL] for n in emus}
    assert [e.unloaded_by_hand_s for e in entries.values()] == [None, None]
    async with http.post(proxy.url + "/proxy/models/unload", json={"model": SMALL}) as r:
        assert r.status == 200 and (await r.json())["unloaded_on"] == ["a"]
    assert all(e.unloaded_by_hand_s is not None for e in entries.values())
