"""GET /v1/models in a fleet lists every model a request may name: each host's list that
answers, merged by id, without models a host may not hold; models.retrieve reads the same."""
from __future__ import annotations

from typing import Any

import openai
import pytest

from proxy.emulator.catalog import CatalogModel
from proxy.engine.memory import GB

from .test_fleet import fleet_config

pytestmark = pytest.mark.timeout(60)

SHARED, MAC_ONLY, PC_ONLY, BARRED = "lab/shared-2b", "lab/mac-3b", "lab/pc-4b", "lab/barred-1b"


def catalog(*keys: str) -> list[CatalogModel]:
    return [CatalogModel(key=k, size_bytes=GB, memory_bytes=GB, load_time_s=0.0) for k in keys]


@pytest.fixture
async def fleet(make_emulator, make_proxy) -> Any:
    emus = {"mac": await make_emulator(catalog=catalog(SHARED, MAC_ONLY)),
            "pc": await make_emulator(catalog=catalog(SHARED, PC_ONLY, BARRED))}
    proxy = await make_proxy("", config=fleet_config(
        [("mac", emus["mac"].url, 24), ("pc", emus["pc"].url, 24)],
        patterns={"pc": ["lab/shared-*", "lab/pc-*"]}))
    return proxy, emus


async def ids(http: Any, url: str) -> list[str]:
    async with http.get(f"{url}/v1/models") as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    assert body["object"] == "list"
    return [m["id"] for m in body["data"]]


async def test_the_list_has_every_hosts_models_once_and_none_a_host_may_not_hold(fleet, http):
    proxy, _ = fleet
    assert await ids(http, proxy.url) == [SHARED, MAC_ONLY, PC_ONLY]
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x")
    try:
        assert (await client.models.retrieve(PC_ONLY)).id == PC_ONLY   # the second host's
        assert [m.id async for m in client.models.list()] == [SHARED, MAC_ONLY, PC_ONLY]
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve(BARRED)
    finally:
        await client.close()


async def test_a_host_that_is_down_leaves_its_models_out_and_the_list_answers(fleet, http):
    proxy, emus = fleet
    await emus["pc"].close()
    assert await ids(http, proxy.url) == [SHARED, MAC_ONLY]
    await emus["mac"].close()
    async with http.get(f"{proxy.url}/v1/models") as r:
        body = await r.json()
    assert r.status == 502, body
    assert "'mac'" in body["error"]["message"] and "'pc'" in body["error"]["message"]


async def test_with_no_list_a_hosts_own_refusal_is_the_answer(make_emulator, make_proxy, http):
    """No host is up: the first is gone, the second refuses the proxy's call (401: no token
    for it). The client gets that refusal, not a 502 that hides it."""
    from proxy.emulator import EmulatorOptions
    gone = await make_emulator(catalog=catalog(SHARED))
    locked = await make_emulator(catalog=catalog(PC_ONLY),
                                 options=EmulatorOptions(api_token="s3cret"))
    proxy = await make_proxy("", config=fleet_config(
        [("gone", gone.url, 24), ("locked", locked.url, 24)]))
    await gone.close()
    await proxy.engine.reconcile()              # no host is up now: each is asked
    assert not any(h.up for h in proxy.engine.hosts)
    async with http.get(f"{proxy.url}/v1/models") as r:
        assert r.status == 401, await r.text()
