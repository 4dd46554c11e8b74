"""A host that stops answering (SIGSTOP of a real emulator process: it still accepts
connections) or dies (SIGKILL) is down for every view of the fleet: /readyz answers at once,
the host is down within its probe deadline with the reason, its models count as not resident,
requests for them go elsewhere, and an error it caused clears when it answers again."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from proxy.configload import load_config
from proxy.emulator.catalog import CatalogModel
from proxy.server.keys import HEALTH
from tests.emuprocess import EmulatorProcess, emulator_process

pytestmark = pytest.mark.timeout(60)
GB = 10**9
MID = "lab/mid-6b"
SMALL = "lab/small-1b"
CATALOG_YAML = f"""models:
  - key: {MID}
    size_gb: 5
    memory_gb: 5
    load_time_s: 0
"""


def catalog() -> list[CatalogModel]:
    return [CatalogModel(key=MID, size_bytes=5 * GB, memory_bytes=5 * GB, load_time_s=0.0),
            CatalogModel(key=SMALL, size_bytes=1 * GB, memory_bytes=1 * GB, load_time_s=0.0)]


def fleet_config(reconcile_interval_s: float = 1, probe_timeout_s: float = 0.5,
                 readiness_max_age_s: float = 2.0, **hosts: str) -> Any:
    return load_config({
        # A silent server would be waited on for read_timeout_s: far past these tests' end.
        "upstream": {"read_timeout_s": 120, "probe_timeout_s": probe_timeout_s,
                     "reconcile_interval_s": reconcile_interval_s,
                     "readiness_max_age_s": readiness_max_age_s},
        "upstreams": [{"name": name, "url": url, "budget_gb": 20}
                      for name, url in hosts.items()],
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100},
        "health": {"hang_threshold_s": 0.05},
        "server": {"shutdown_timeout_s": 1},
        "storage": {"enabled": False}})


@pytest.fixture
async def beta(tmp_path: Path) -> AsyncIterator[EmulatorProcess]:
    async with emulator_process(tmp_path, CATALOG_YAML) as emu:
        yield emu


async def until(condition: Any, within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not condition():
            await asyncio.sleep(0.02)


async def get(http: Any, url: str) -> tuple[int, Any]:
    async with http.get(url) as r:
        return r.status, await r.json()


async def test_a_frozen_host_is_down_within_its_probe_deadline(beta, make_emulator,
                                                               make_proxy, http):
    alpha = await make_emulator(catalog=catalog())
    proxy = await make_proxy("", config=fleet_config(2, 2, beta=beta.url, alpha=alpha.url))
    fleet = proxy.engine
    await fleet.load(MID, host="beta")
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": MID, "stream": True, "max_tokens": 400,
            "messages": [{"role": "user", "content": "tell me a long story"}]}) as stream:
        assert stream.headers["X-Proxy-Host"] == "beta"
        await stream.content.readuntil(b"\n\n")
        beta.freeze()

        # /readyz answers within the probe deadline (2 s), not after read_timeout_s; once
        # the host is known down, at once (its looks go on in the background).
        async with asyncio.timeout(5):
            status, body = await get(http, f"{proxy.url}/readyz")
        assert status == 200
        host = fleet.by_name["beta"]
        await until(lambda: not host.up)
        started = time.monotonic()
        async with asyncio.timeout(3):
            status, body = await get(http, f"{proxy.url}/readyz")
        assert status == 200 and body["hosts_up"] == 1 and time.monotonic() - started < 1.0
        assert not body["hosts"]["beta"]["up"]
        assert "within 2s (upstream.probe_timeout_s)" in body["hosts"]["beta"]["error"]

        # Its model counts as not resident: a request for it is served on alpha.
        async with asyncio.timeout(10):
            async with http.post(f"{proxy.url}/v1/chat/completions", json={
                    "model": MID, "max_tokens": 2,
                    "messages": [{"role": "user", "content": "x"}]}) as r:
                assert r.status == 200 and r.headers["X-Proxy-Host"] == "alpha"

        # The silent stream on beta is beta's being down, not a hang of a server that answers.
        await until(lambda: any(time.monotonic() - lease.last_activity_s > 0.05
                                for lease in fleet.active_leases()))
        report = await proxy.app[HEALTH].check()
        alerts = {a["id"]: a for a in report["alerts"]}
        assert "host_down:beta" in alerts and "probe_timeout_s" in alerts["host_down:beta"][
            "message"]
        assert not [a for a in alerts.values() if a["rule"] == "hang"], alerts
        beta.kill()   # the stream ends; the proxy's shutdown does not wait on it


async def test_models_on_a_dead_host_are_not_resident_in_any_view(beta, make_emulator,
                                                                  make_proxy, http):
    alpha = await make_emulator(catalog=catalog())
    proxy = await make_proxy("", config=fleet_config(alpha=alpha.url, beta=beta.url))
    fleet = proxy.engine
    await fleet.load(MID, host="alpha")
    await fleet.load(MID, host="beta")
    beta.kill()
    await fleet.reconcile()
    assert not fleet.by_name["beta"].up

    _, models = await get(http, f"{proxy.url}/proxy/models")
    row = next(m for m in models["data"] if m["model"] == MID)
    assert row["hosts"] == {"alpha": "loaded", "beta": "unloaded"}
    _, stats = await get(http, f"{proxy.url}/proxy/stats")
    assert stats["hosts"]["beta"]["loaded_models"] == []
    assert stats["model_counts"]["loaded"] == 1
    _, health = await get(http, f"{proxy.url}/proxy/health")
    assert health["system_health"]["hosts"]["beta"]["loaded_models"] == []
    async with http.get(f"{proxy.url}/metrics") as r:
        metrics = await r.text()
    assert 'proxy_host_loaded_models{host="beta"} 0.0' in metrics
    assert f'proxy_model_loaded{{host="beta",model="{MID}"}} 0.0' in metrics

    # Held only by the dead host: its row says so too.
    await fleet.unload(MID, host="alpha")
    _, models = await get(http, f"{proxy.url}/proxy/models")
    row = next(m for m in models["data"] if m["model"] == MID)
    assert row["state"] == "unloaded" and row["hosts"]["beta"] == "unloaded"
    assert row["owner"] is None and row["instances"] == []
    async with http.post(f"{proxy.url}/proxy/models/pin", json={"model": MID}) as r:
        assert (await r.json())["state"] == "unloaded"
    _, stats = await get(http, f"{proxy.url}/proxy/stats")
    assert stats["upstream"]["hosts"] == ["alpha"]


async def test_readyz_with_no_host_up_waits_for_a_look_at_each(beta, make_proxy, http):
    """Every host known down: the probe awaits its looks (not the last known state), so the
    first probe after a host is back says ready, however recent the failed look was."""
    proxy = await make_proxy("", config=fleet_config(60, readiness_max_age_s=60, beta=beta.url))
    fleet = proxy.engine
    beta.kill()
    await fleet.reconcile()
    assert not fleet.by_name["beta"].up
    await beta.start()
    status, body = await get(http, f"{proxy.url}/readyz")
    assert status == 200 and body["hosts"]["beta"]["up"], body


async def test_a_load_that_could_not_reach_its_host_clears_when_it_answers(
        beta, make_emulator, make_proxy, http):
    alpha = await make_emulator(catalog=catalog())
    proxy = await make_proxy("", config=fleet_config(alpha=alpha.url, beta=beta.url))
    fleet = proxy.engine
    beta.kill()
    async with http.post(f"{proxy.url}/proxy/models/load",
                         json={"model": MID, "host": "beta"}) as r:
        assert r.status == 502
    _, models = await get(http, f"{proxy.url}/proxy/models")
    row = next(m for m in models["data"] if m["model"] == MID)
    assert row["hosts"]["beta"] == "error"
    assert "cannot reach" in row["host_errors"]["beta"]   # the error travels with the state

    await beta.start()
    host = fleet.by_name["beta"]
    await until(lambda: host.up)
    _, models = await get(http, f"{proxy.url}/proxy/models")
    row = next(m for m in models["data"] if m["model"] == MID)
    assert row["hosts"]["beta"] == "unloaded" and row["host_errors"] == {}
    async with http.post(f"{proxy.url}/proxy/models/load",
                         json={"model": MID, "host": "beta"}) as r:
        assert r.status == 200, await r.text()   # no backoff left from the host's absence


@pytest.mark.parametrize("copies", [("alpha",), ("alpha", "beta")])
async def test_a_request_with_every_host_dead_names_each_host(copies, beta, make_emulator,
                                                              make_proxy, http):
    """Its first host fails, then the one it is placed on next: a load there (one copy) or
    the request itself (a copy on each)."""
    alpha = await make_emulator(catalog=catalog())
    proxy = await make_proxy("", config=fleet_config(60, alpha=alpha.url, beta=beta.url))
    for host in copies:
        await proxy.engine.load(MID, host=host)
    await alpha.close()
    beta.kill()
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": MID, "messages": [{"role": "user", "content": "x"}]}) as r:
        body = await r.json()
    assert r.status == 502, body
    assert "'alpha'" in body["error"]["message"] and "'beta'" in body["error"]["message"]
    # Each host it tried is set aside until it answers again, the second one too (or its
    # engine's own reconcile found it dead first, when the machine is slow).
    _, hosts = await get(http, f"{proxy.url}/proxy/stats")
    assert {name: h["up"] for name, h in hosts["hosts"].items()} == {
        "alpha": False, "beta": False}
    assert hosts["hosts"]["alpha"]["suspect"]


async def test_the_engine_lines_of_a_fleet_reconcile_name_their_host(make_emulator,
                                                                     make_proxy, http,
                                                                     caplog):
    alpha = await make_emulator(catalog=catalog())
    beta = await make_emulator(catalog=catalog())
    # No reconcile tick of the hosts' own during the test: the fleet's call is the one.
    proxy = await make_proxy("", config=fleet_config(60, alpha=alpha.url, beta=beta.url))
    caplog.set_level(logging.INFO, logger="proxy.engine")
    await beta.state.load(SMALL)      # by someone else: the next reconcile notices it
    await proxy.engine.reconcile()
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.engine"]
    assert f"host beta: {SMALL} was loaded outside the proxy" in lines, lines
    await proxy.engine.load(SMALL, host="alpha")
    caplog.clear()
    await proxy.engine.clear()        # an operator's clear: each host's unloads name it
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.engine"]
    assert lines and all(line.startswith("host alpha: ") for line in lines), lines


async def test_fleet_health_names_the_hosts_and_counts_only_what_hosts_may_hold(
        make_emulator, make_proxy, http):
    alpha = await make_emulator(catalog=catalog())
    beta = await make_emulator(catalog=catalog())
    config = load_config({
        "upstreams": [{"name": "alpha", "url": alpha.url, "budget_gb": 20},
                      {"name": "beta", "url": beta.url, "budget_gb": 20,
                       "models": ["lab/small-*"]}],
        "storage": {"enabled": False}})
    proxy = await make_proxy("", config=config)
    _, health = await get(http, f"{proxy.url}/proxy/health")
    upstream = health["system_health"]["upstream"]
    assert "url" not in upstream
    assert upstream["urls"] == {"alpha": alpha.url, "beta": beta.url}
    _, stats = await get(http, f"{proxy.url}/proxy/stats")
    _, models = await get(http, f"{proxy.url}/proxy/models")
    pairs = sum(len(m["hosts"]) for m in models["data"])
    assert pairs == 3 and sum(stats["model_counts"].values()) == pairs


async def test_a_row_held_only_by_a_dead_host_has_no_owner_nor_instances(beta, make_proxy,
                                                                         http):
    """The row is the dead host's own (no other host lists the model): its state, owner and
    instances say not resident, and so does an admin answer's state."""
    proxy = await make_proxy("", config=fleet_config(60, beta=beta.url))
    await proxy.engine.load(MID, host="beta")
    beta.kill()
    await proxy.engine.reconcile()
    _, models = await get(http, f"{proxy.url}/proxy/models")
    row = next(m for m in models["data"] if m["model"] == MID)
    assert (row["state"], row["owner"], row["instances"]) == ("unloaded", None, [])
    async with http.post(f"{proxy.url}/proxy/models/pin", json={"model": MID}) as r:
        assert (await r.json())["state"] == "unloaded"


async def test_a_request_queued_on_one_host_of_a_fleet_is_a_hang_there(make_emulator,
                                                                        make_proxy, http):
    """MID is listed by both hosts and preferred on beta, whose load of it does not end: the
    request queued there is a hang of beta's, though alpha (listed first) has no queue."""
    alpha = await make_emulator(catalog=catalog())
    beta = await make_emulator(catalog=catalog())
    config = load_config({
        "upstreams": [{"name": "alpha", "url": alpha.url, "budget_gb": 20},
                      {"name": "beta", "url": beta.url, "budget_gb": 20}],
        "models": {MID: {"host": "beta"}},
        "health": {"hang_threshold_s": 0.05}, "storage": {"enabled": False}})
    proxy = await make_proxy("", config=config)
    gate = beta.state.faults.load_gate[MID] = asyncio.Event()
    request = asyncio.create_task(http.post(f"{proxy.url}/v1/chat/completions", json={
        "model": MID, "max_tokens": 2, "messages": []}))
    await beta.state.wait_for(lambda: beta.state.loading[MID] == 1)
    async with asyncio.timeout(10):
        while True:
            alerts = {a["id"]: a for a in (await proxy.app[HEALTH].check())["alerts"]}
            if f"hang:queued:{MID}" in alerts:
                break
            await asyncio.sleep(0.02)
    assert "on host 'beta'" in alerts[f"hang:queued:{MID}"]["message"]
    gate.set()
    async with await request as r:
        assert r.status == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_sent_to_a_host_that_freezes_goes_to_another_once_it_is_down(
        stream, beta, make_emulator, make_proxy, http):
    """Sent to beta, which froze before answering: once beta is counted down (its reconcile's
    look fails), the request goes to alpha, instead of waiting read_timeout_s (120 s here)."""
    alpha = await make_emulator(catalog=catalog())
    proxy = await make_proxy("", config=fleet_config(60, beta=beta.url, alpha=alpha.url))
    fleet = proxy.engine
    await fleet.load(MID, host="beta")
    beta.freeze()
    sent = asyncio.create_task(http.post(f"{proxy.url}/v1/chat/completions", json={
        "model": MID, "max_tokens": 2, "stream": stream,
        "messages": [{"role": "user", "content": "x"}]}))
    await until(lambda: any(lease.host == "beta" for lease in fleet.active_leases()))
    assert not sent.done()
    await fleet.by_name["beta"].core.reconcile()     # its look times out: beta is down
    async with asyncio.timeout(10):
        async with await sent as r:
            body = await r.read()
            assert r.status == 200, body
            assert r.headers["X-Proxy-Host"] == "alpha"
    assert alpha.state.instances_of(MID)
    assert fleet.by_name["beta"].lost().done()   # asked while it is down: at once
    beta.kill()


async def test_the_model_list_does_not_wait_for_a_host_known_down(beta, make_emulator,
                                                                  make_proxy, http):
    alpha = await make_emulator(catalog=[catalog()[1]])
    proxy = await make_proxy("", config=fleet_config(60, beta=beta.url, alpha=alpha.url))
    beta.freeze()
    await proxy.engine.by_name["beta"].core.reconcile()     # its look times out: down
    async with asyncio.timeout(10):   # (a look at beta would wait read_timeout_s, 120 s)
        status, body = await get(http, f"{proxy.url}/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [SMALL]
    beta.kill()


async def test_the_model_list_leaves_out_a_host_frozen_before_anything_noticed(
        beta, make_emulator, make_proxy, http):
    """Nothing has counted beta down yet: its list is waited for its probe deadline (0.5 s
    here), not read_timeout_s (120 s), and left out."""
    alpha = await make_emulator(catalog=[catalog()[1]])
    proxy = await make_proxy("", config=fleet_config(60, beta=beta.url, alpha=alpha.url))
    beta.freeze()
    assert proxy.engine.by_name["beta"].up
    async with asyncio.timeout(10):
        status, body = await get(http, f"{proxy.url}/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [SMALL]
    beta.kill()
