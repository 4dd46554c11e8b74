"""A replica killed with SIGKILL (a real `python -m proxy` process) while it holds a load lock
and the leader's lease: the other replica takes both over within their TTLs."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.configload import load_config
from proxy.emulator.catalog import CatalogModel
from proxy.engine.memory import GB
from proxy.server.keys import REPLICA
from proxy.state import create_state

from .emuprocess import answering, free_port
from .redis_server import make_redis_server, redis_server  # noqa: F401

pytestmark = pytest.mark.timeout(90)
MID = "lab/mid-6b"
LOCK_TTL_S, LEASE_TTL_S = 2.0, 1.5


def raw_config(upstream_url: str, redis_url: str, name: str) -> dict[str, Any]:
    return {"upstream": {"url": upstream_url},
            "state": {"backend": "redis", "url": redis_url, "replica_id": name,
                      "lease_ttl_s": LEASE_TTL_S, "lock_ttl_s": LOCK_TTL_S},
            "memory": {"sampler": "budget", "budget_gb": 20, "min_free_memory_gb": 0},
            "storage": {"enabled": False}}


async def until(condition: Any, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not await condition():
            await asyncio.sleep(0.05)


async def test_a_killed_replicas_load_lock_and_leadership_pass_to_the_other(
        make_emulator, make_proxy, redis_server, tmp_path: Path, http):
    emu = await make_emulator(catalog=[CatalogModel(key=MID, size_bytes=5 * GB,
                                                    memory_bytes=5 * GB, load_time_s=0.0)])
    gate = emu.state.faults.load_gate[MID] = asyncio.Event()
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(raw_config(emu.url, redis_server.url, "A")))
    port = free_port()
    a = subprocess.Popen([sys.executable, "-m", "proxy", "--config", str(path),
                          "--port", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        a_url = f"http://127.0.0.1:{port}"
        await answering(f"{a_url}/healthz")
        probe = create_state(redis_server.url, replica_id="probe")
        await until(lambda: _is(probe.leader(), "A"), 10)          # A came first: it leads
        b = await make_proxy("", config=load_config(raw_config(emu.url, redis_server.url,
                                                               "B")))
        # A starts loading MID (the emulator holds the load) and holds the load lock.
        asking_a = asyncio.ensure_future(http.post(f"{a_url}/v1/chat/completions", json={
            "model": MID, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}))
        await until(lambda: _is(probe.lock_holder("default", MID), "A"), 10)
        a.send_signal(signal.SIGKILL)
        a.wait(5)
        asking_a.cancel()
        started = asyncio.get_running_loop().time()
        gate.set()
        async with http.post(f"{b.url}/v1/chat/completions", json={
                "model": MID, "max_tokens": 2,
                "messages": [{"role": "user", "content": "x"}]}) as r:
            await r.read()
            assert r.status == 200
        took_s = asyncio.get_running_loop().time() - started
        assert took_s < LOCK_TTL_S + 5.0, f"B waited {took_s:.1f} s for a dead replica's lock"
        assert len(emu.state.instances_of(MID)) == 1          # adopted or loaded, never two
        await until(lambda: _true(b.app[REPLICA].leader), LEASE_TTL_S + 3.0)
        await probe.close()
    finally:
        if a.poll() is None:
            a.kill()
            a.wait(5)


async def _is(call: Any, expected: str) -> bool:
    return await call == expected


async def _true(value: bool) -> bool:
    return value
