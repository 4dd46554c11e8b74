"""What a load teaches and commits (engine/loader.py): a footprint only from a drop in this
machine's memory that a local sampler saw across a load alone and plausible for its file; the
load time the server reports, else the one measured; ownership on disk before the model serves;
a bound learned from a refusal dropped once the model loads."""
from __future__ import annotations

import asyncio
from typing import Any, Mapping

import pytest

from proxy.configload import load_config
from proxy.emulator import CatalogModel
from proxy.engine.clock import ManualClock
from proxy.engine.memory import MemorySample
from proxy.errors import ModelLoadFailed
from proxy.library import ModelMemoryManager
from proxy.store import UsageStore
from proxy.upstream.base import Capabilities, LoadResult
from proxy.upstream.lmstudio import LMStudioUpstream

from .fakes import GB, ScriptedBackend

pytestmark = pytest.mark.timeout(30)

# Each a 4 GB file; what it holds once loaded decides whether the drop is believed.
FIVE, HALF, TRIPLE, UNDER, OVER = (f"lab/{n}" for n in ("five", "half", "triple", "under",
                                                         "over"))
A, B = "lab/a", "lab/b"
HOLDS_GB = {FIVE: 5, HALF: 2, TRIPLE: 12, UNDER: 1.9, OVER: 13, A: 4, B: 2}
CATALOG = [CatalogModel(key=k, size_bytes=4 * GB, memory_bytes=int(gb * GB), load_time_s=0.0)
           for k, gb in HOLDS_GB.items()]


class HostSampler:
    """This machine's memory as a sampler reads it: 32 GB less what the emulator's instances
    hold. `local` says whether it reads this host (psutil) or not (a budget, a remote host)."""
    blocking = False

    def __init__(self, state: Any, *, local: bool) -> None:
        self.state = state
        self.local = local

    def sample(self) -> MemorySample:
        return MemorySample(32 * GB, 32 * GB - self.state.used_bytes())


@pytest.fixture
async def lab(make_emulator):
    return await make_emulator(catalog=CATALOG, capacity_bytes=64 * GB)


@pytest.fixture
async def engine():
    made = []

    async def make(url, *, sampler=None, store=None, upstream=None, clock=None):
        config = load_config({"upstream": {"url": url},
                              "memory": {"sampler": "budget", "budget_gb": 32,
                                         "min_free_memory_gb": 0,
                                         "max_memory_usage_percent": 100},
                              "eviction": {"hold": 0, "queue_timeout_s": 10},
                              "storage": {"enabled": False}})
        mgr = ModelMemoryManager(config=config, sampler=sampler, store=store,
                                 upstream=upstream or LMStudioUpstream(config.upstream),
                                 clock=clock or ManualClock(), owns_upstream=upstream is None)
        made.append(mgr)
        await mgr.start()
        return mgr
    yield make
    for mgr in made:
        await mgr.cleanup()


# -- the footprint: a plausible drop, seen by a local sampler, across a load alone -------------
@pytest.mark.parametrize("key, learned_gb", [
    (FIVE, 5), (HALF, 2), (TRIPLE, 12),       # half and three times its file: still believed
    (UNDER, None), (OVER, None)])             # outside that: another program's doing
async def test_a_footprint_is_learned_only_within_its_plausible_window(lab, engine, key,
                                                                       learned_gb):
    mgr = await engine(lab.url, sampler=HostSampler(lab.state, local=True))
    (await mgr.acquire(key)).release()
    e = mgr.entry(key)
    if learned_gb is None:
        assert e.footprint_bytes is None and e.footprint_samples == 0
    else:
        assert e.footprint_bytes == learned_gb * GB and e.footprint_samples == 1


async def test_a_sampler_that_does_not_read_this_host_teaches_nothing(lab, engine):
    mgr = await engine(lab.url, sampler=HostSampler(lab.state, local=False))
    (await mgr.acquire(FIVE)).release()
    assert mgr.entry(FIVE).footprint_bytes is None


async def first_load_with_another(lab, mgr, other, finish_other: bool) -> None:
    """A's load starts alone; `other`'s load starts while A's runs, and either ends before
    A's does (finish_other) or is still running when A's ends."""
    gate_a = lab.state.faults.load_gate[A] = asyncio.Event()
    gate_other = lab.state.faults.load_gate[other] = asyncio.Event()
    first = asyncio.create_task(mgr.acquire(A))
    await lab.state.wait_for(lambda: lab.state.loading[A] == 1)
    second = asyncio.create_task(mgr.acquire(other))
    await lab.state.wait_for(lambda: lab.state.loading[other] == 1)
    if finish_other:
        gate_other.set()
        try:
            (await second).release()
        except ModelLoadFailed:
            pass
    gate_a.set()
    (await first).release()
    if not finish_other:
        gate_other.set()
        (await second).release()


async def test_no_footprint_while_another_load_is_still_running(lab, engine):
    mgr = await engine(lab.url, sampler=HostSampler(lab.state, local=True))
    await first_load_with_another(lab, mgr, B, finish_other=False)
    assert mgr.entry(A).footprint_bytes is None


async def test_no_footprint_across_another_load_that_finished_meanwhile(lab, engine):
    mgr = await engine(lab.url, sampler=HostSampler(lab.state, local=True))
    await first_load_with_another(lab, mgr, B, finish_other=True)   # A's drop holds B's 2 GB
    assert lab.state.instances_of(A) and lab.state.instances_of(B)
    assert mgr.entry(A).footprint_bytes is None and mgr.entry(B).footprint_bytes is None


async def test_no_footprint_across_another_load_that_failed_meanwhile(lab, engine):
    """A failed load may leave memory behind on the server: it is a change like a load."""
    lab.state.faults.load_fail[B] = "GGUF file is corrupt"
    mgr = await engine(lab.url, sampler=HostSampler(lab.state, local=True))
    await first_load_with_another(lab, mgr, B, finish_other=True)
    assert mgr.entry(B).status.value == "error"
    assert mgr.entry(A).footprint_bytes is None


async def test_no_footprint_across_an_sdk_load_that_finished_meanwhile(lab, engine):
    mgr = await engine(lab.url, sampler=HostSampler(lab.state, local=True))
    gate = lab.state.faults.load_gate[A] = asyncio.Event()
    first = asyncio.create_task(mgr.acquire(A))
    await lab.state.wait_for(lambda: lab.state.loading[A] == 1)
    load = await mgr.admit_load(B, owner="sdk:1")            # a client's loadModel
    load.loaded((await lab.state.load(B)).instance_id)
    gate.set()
    (await first).release()
    assert mgr.entry(A).footprint_bytes is None              # its drop holds B's 2 GB


# -- the load time: the server's own figure, else the time the load took -------------------
class TimedBackend(ScriptedBackend):
    """Loads take `took_s` on the engine's clock; the server reports `reports_s` (or not)."""

    def __init__(self, clock: ManualClock, took_s: float, reports_s: float | None) -> None:
        super().__init__({A: 4.0}, Capabilities(manages_loading=True, reports_memory=False,
                                                self_evicts=False, multi_instance=False,
                                                native_clients=False))
        self.clock, self.took_s, self.reports_s = clock, took_s, reports_s

    async def load(self, key: str, options: Mapping[str, Any]) -> LoadResult:
        result = await super().load(key, options)
        self.clock.advance(self.took_s)
        return LoadResult(result.instance_id, self.reports_s)


@pytest.mark.parametrize("reports_s, learned_s", [(7.5, 7.5), (None, 2.0)])
async def test_the_load_time_is_the_servers_figure_else_the_measured_one(engine, reports_s,
                                                                         learned_s):
    clock = ManualClock()
    mgr = await engine("http://127.0.0.1:9", clock=clock,
                       upstream=TimedBackend(clock, took_s=2.0, reports_s=reports_s))
    (await mgr.acquire(A)).release()
    assert mgr.entry(A).load_time_s == learned_s and mgr.entry(A).load_count == 1


# -- ownership is on disk before the model serves ----------------------------------------------
async def test_ownership_is_on_disk_when_the_first_request_gets_the_model(lab, engine,
                                                                          tmp_path):
    store = UsageStore(tmp_path / "history.sqlite3")
    mgr = await engine(lab.url, store=store)
    lease = await mgr.acquire(FIVE)
    again = UsageStore(store.path)                   # what a crash now would leave
    try:
        assert again.open() and list(again.load(lab.url)["owned"]) == [FIVE]
    finally:
        again.close()
        lease.release()


async def test_an_sdk_load_teaches_its_load_time(lab, engine):
    mgr = await engine(lab.url)
    load = await mgr.admit_load(A, owner="sdk:1")
    mgr.clock.advance(3)
    load.loaded((await lab.state.load(A)).instance_id)
    assert (mgr.entry(A).load_time_s, mgr.entry(A).load_count) == (3.0, 1)


async def test_an_sdk_loads_load_time_survives_a_restart(lab, engine, tmp_path):
    path = tmp_path / "history.sqlite3"
    mgr = await engine(lab.url, store=UsageStore(path))
    load = await mgr.admit_load(A, owner="sdk:1")
    mgr.clock.advance(3)
    load.loaded((await lab.state.load(A)).instance_id)
    await mgr.cleanup()
    again = await engine(lab.url, store=UsageStore(path))
    assert (again.entry(A).load_time_s, again.entry(A).load_count) == (3.0, 1)


# -- memory is sampled at once after a failed load ---------------------------------------------
async def test_memory_is_sampled_right_after_a_failed_load(lab, engine):
    lab.state.faults.load_fail[B] = "GGUF file is corrupt"
    gate = lab.state.faults.load_gate[B] = asyncio.Event()
    mgr = await engine(lab.url, sampler=HostSampler(lab.state, local=True))
    attempt = asyncio.create_task(mgr.acquire(B))
    await lab.state.wait_for(lambda: lab.state.loading[B] == 1)
    await lab.state.load(A)                                  # meanwhile, in LM Studio's GUI
    gate.set()
    with pytest.raises(ModelLoadFailed):
        await attempt
    assert mgr.last_sample.available_bytes == 28 * GB


async def test_memory_is_sampled_right_after_a_failed_sdk_load(lab, engine):
    mgr = await engine(lab.url, sampler=HostSampler(lab.state, local=True))
    load = await mgr.admit_load(B, owner="sdk:1")
    await lab.state.load(A)                                  # meanwhile, in LM Studio's GUI
    load.failed("the client ran out of disk")
    async with asyncio.timeout(5):
        while mgr.last_sample.available_bytes != 28 * GB:
            await asyncio.sleep(0)


# -- a load whose client left: the proxy's only if sent, watched from the load's start ---------
async def test_a_load_its_client_left_before_sending_is_not_the_proxys(lab, engine):
    mgr = await engine(lab.url)
    load = await mgr.admit_load(A, owner="sdk:1")
    load.left(sent=False)                                    # LM Studio never heard of it
    await lab.state.load(A)                                  # a human loads it in the GUI
    await mgr.reconcile()
    assert mgr.entry(A).owner == "external"


async def test_a_left_load_is_watched_from_when_it_started(lab, engine):
    mgr = await engine(lab.url)
    load = await mgr.admit_load(A, owner="sdk:1")
    mgr.clock.advance(600)
    load.left(sent=True)
    mgr.clock.advance(400)                  # 1000 s since the load started: past the watch
    await lab.state.load(A)
    await mgr.reconcile()
    assert mgr.entry(A).owner == "external"


async def test_a_load_that_succeeds_clears_the_last_error(lab, engine):
    lab.state.faults.load_fail[A] = "transient"
    mgr = await engine(lab.url)
    with pytest.raises(ModelLoadFailed):
        await mgr.acquire(A)
    del lab.state.faults.load_fail[A]
    mgr.clock.advance(5)                                     # past the backoff
    (await mgr.acquire(A)).release()
    assert mgr.get_memory_stats()["models"][A]["last_error"] is None
