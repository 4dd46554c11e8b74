"""The engine in ordinary operation: restarts, probes, trusted footprints, listeners that fail,
ownership in the views, and the rules each part implements."""
from __future__ import annotations

import itertools

import pytest

from proxy.configload import load_config
from proxy.emulator import CatalogModel
from proxy.engine.clock import ManualClock
from proxy.engine.lifecycle import TRANSITIONS, ModelStatus
from proxy.library import ModelMemoryManager
from proxy.engine.memory import MemorySample
from proxy.engine.policy import HELD, NOT_OURS, PINNED, SERVING, blocker
from proxy.server.keys import HEALTH
from proxy.store import UsageStore
from proxy.upstream.lmstudio import LMStudioUpstream

from .fakes import GB

MODEL = "qwen/qwen3-4b"
M = "lab/m"


class NoMemoryMoves:
    """A local sampler in front of an emulator that allocates nothing: free memory only
    wanders by itself (here, down by 300 MB per sample)."""
    blocking = False
    local = True

    def __init__(self) -> None:
        self.available = 30 * GB
        self.samples = 0

    def sample(self) -> MemorySample:
        self.samples += 1
        self.available -= 300_000_000
        return MemorySample(32 * GB, self.available)


async def managed(url, *, store=None, sampler=None, clock=None, **sections):
    raw = {"upstream": {"url": url},
           "memory": {"sampler": "budget", "budget_gb": 32, "min_free_memory_gb": 0},
           "storage": {"enabled": False}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    config = load_config(raw)
    mgr = ModelMemoryManager(config=config, upstream=LMStudioUpstream(config.upstream),
                             owns_upstream=True, store=store, sampler=sampler, clock=clock)
    await mgr.start()
    return mgr


# -- ownership across a restart --------------------------------------------------------------
async def test_a_restarted_proxy_still_owns_what_it_loaded(emulator, tmp_path):
    path = tmp_path / "history.sqlite3"
    first = await managed(emulator.url, store=UsageStore(path))
    (await first.acquire(MODEL)).release()
    await first.cleanup()                          # the proxy restarts; LM Studio keeps it
    await emulator.state.load("google/gemma-3-12b")  # meanwhile someone loads another one
    second = await managed(emulator.url, store=UsageStore(path))
    assert second.entry(MODEL).owner == "proxy"
    assert second.entry("google/gemma-3-12b").owner == "external"
    assert await second.clear_all_models() == [MODEL]   # eviction works on it again
    assert emulator.state.instances_of("google/gemma-3-12b")
    await second.cleanup()
    third = await managed(emulator.url, store=UsageStore(path))
    assert third.entry(MODEL).status is ModelStatus.UNLOADED
    await third.cleanup()


async def test_ownership_ends_when_lm_studio_lost_the_instance(emulator, tmp_path):
    path = tmp_path / "history.sqlite3"
    first = await managed(emulator.url, store=UsageStore(path))
    (await first.acquire(MODEL)).release()
    await emulator.state.unload_all()              # LM Studio restarted
    await first.reconcile()
    await first.cleanup()
    await emulator.state.load(MODEL)               # a human loads it again
    second = await managed(emulator.url, store=UsageStore(path))
    assert second.entry(MODEL).owner == "external"
    await second.cleanup()


async def test_owner_is_shown_in_stats_and_models(emulator, make_proxy, http):
    await emulator.state.load("google/gemma-3-12b")
    proxy = await make_proxy(emulator.url)
    (await proxy.engine.acquire(MODEL)).release()
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        stats = (await r.json())["models"]
    async with http.get(f"{proxy.url}/proxy/models") as r:
        rows = {row["model"]: row for row in (await r.json())["data"]}
    for view in (stats, rows):
        assert view[MODEL]["owner"] == "proxy"
        assert view["google/gemma-3-12b"]["owner"] == "external"
        assert view["openai/gpt-oss-20b"]["owner"] is None


# -- probes hold, they do not use --------------------------------------------------------------
async def test_ten_minutes_of_probes_are_no_use(emulator, make_proxy, http):
    clock = ManualClock()
    proxy = await make_proxy(emulator.url, app_kwargs={"clock": clock},
                             **{"health.probe_interval_s": 60, f"models.{MODEL}.ttl_s": 300})
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 1, "messages": []}) as r:
        assert r.status == 200
    engine, health = proxy.engine, proxy.app[HEALTH]
    entry = engine.entry(MODEL)
    heat_before = entry.heat
    for _ in range(10):
        clock.advance(60)
        await health.check()
        assert health.probes[MODEL].ok
    assert emulator.state.inference_calls[MODEL] == 11          # the request and ten probes
    assert entry.heat == heat_before and engine.usage(MODEL).requests == 1
    assert await engine.unload_idle_models() == [MODEL]


async def test_a_hold_keeps_the_model_but_changes_nothing_about_its_use(emulator):
    clock = ManualClock()
    mgr = await managed(emulator.url, clock=clock)
    (await mgr.acquire(MODEL)).release()
    entry = mgr.entry(MODEL)
    used_at, heat = entry.last_used_at_s, entry.heat
    clock.advance(30)
    hold = mgr.hold(MODEL)
    hold.release()
    assert (entry.last_used_at_s, entry.heat) == (used_at, heat)
    assert mgr.hold("google/gemma-3-12b") is None                # holds never load
    await mgr.cleanup()


async def test_a_held_model_is_not_unloaded_under_it(emulator):
    from proxy.errors import ModelUnavailable
    mgr = await managed(emulator.url)
    (await mgr.acquire(MODEL)).release()
    hold = mgr.hold(MODEL)
    with pytest.raises(ModelUnavailable):
        await mgr.unload(MODEL, drain_timeout_s=0.05)
    assert await mgr.unload_idle_models() == [] and mgr.core.evictor.candidates(
        exclude=None, critical=True) == []
    hold.release()
    assert await mgr.unload(MODEL) is True
    await mgr.cleanup()


# -- footprints that can be trusted ------------------------------------------------------------
async def test_noise_is_not_learned_as_a_footprint(emulator):
    sampler = NoMemoryMoves()
    mgr = await managed(emulator.url, sampler=sampler,
                        memory={"sampler": "local", "min_free_memory_gb": 0})
    (await mgr.acquire(MODEL)).release()             # 2.5 GB file, a 0.3 GB "drop"
    assert mgr.entry(MODEL).footprint_bytes is None
    before = sampler.samples
    assert await mgr.clear_all_models() == [MODEL]
    assert sampler.samples - before <= 1             # no waiting for memory that never left
    await mgr.cleanup()


async def test_a_budget_sampler_never_learns_footprints(emulator):
    mgr = await managed(emulator.url)
    (await mgr.acquire(MODEL)).release()
    assert mgr.entry(MODEL).footprint_bytes is None and mgr.entry(MODEL).load_count == 1
    await mgr.cleanup()


class EmulatedHostSampler:
    """Local memory that moves exactly with the emulator's account."""
    blocking = False
    local = True

    def __init__(self, state):
        self.state = state

    def sample(self):
        return MemorySample(64 * GB, 64 * GB - self.state.used_bytes())


async def test_learned_footprints_are_kept_per_upstream(make_emulator, tmp_path):
    catalog = [CatalogModel(M, size_bytes=int(4 * GB), memory_bytes=int(5 * GB))]
    demo, real = await make_emulator(catalog=catalog), await make_emulator(catalog=catalog)
    path = tmp_path / "history.sqlite3"
    local = {"memory": {"sampler": "local", "min_free_memory_gb": 0}}
    first = await managed(demo.url, store=UsageStore(path), sampler=EmulatedHostSampler(
        demo.state), **local)
    (await first.acquire(M)).release()
    assert first.entry(M).footprint_bytes == 5 * GB
    await first.cleanup()
    again = await managed(demo.url, store=UsageStore(path),
                          sampler=EmulatedHostSampler(demo.state), **local)
    assert again.entry(M).footprint_bytes == 5 * GB        # same upstream: restored
    await again.cleanup()
    other = await managed(real.url, store=UsageStore(path),
                          sampler=EmulatedHostSampler(real.state), **local)
    assert other.entry(M).footprint_bytes is None          # another upstream: not applied
    await other.cleanup()


async def test_a_remote_upstream_teaches_no_footprints(make_emulator):
    catalog = [CatalogModel(M, size_bytes=int(4 * GB), memory_bytes=int(5 * GB))]
    emu = await make_emulator(catalog=catalog)
    mgr = await managed(emu.url, sampler=EmulatedHostSampler(emu.state),
                        memory={"sampler": "local", "min_free_memory_gb": 0})
    mgr.apply_config(load_config({"upstream": {"url": emu.url.replace("127.0.0.1",
                                                                      "192.0.2.10")},
                                  "memory": {"sampler": "local", "min_free_memory_gb": 0},
                                  "storage": {"enabled": False}}))
    assert not mgr.core.loader.learns_footprints
    await mgr.cleanup()


# -- listeners that fail ---------------------------------------------------------------------
class Broken:
    def __getattr__(self, name):
        if name.startswith("on_"):
            def fail(*args):
                raise RuntimeError(f"listener bug in {name}")
            return fail
        raise AttributeError(name)


async def test_a_failing_listener_breaks_neither_requests_nor_unloads(emulator, make_proxy,
                                                                      http, caplog):
    proxy = await make_proxy(emulator.url)
    proxy.engine.add_listener(Broken())
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "messages": []}) as r:
        assert r.status == 200
    assert proxy.engine.usage(MODEL).requests == 1
    assert await proxy.engine.unload(MODEL) is True
    assert not emulator.state.instances
    assert "listener bug in on_unload" in caplog.text


# -- the rules, one at a time ------------------------------------------------------------------
S = ModelStatus
ALLOWED = {(S.UNLOADED, S.LOADING), (S.UNLOADED, S.LOADED), (S.LOADING, S.LOADED),
           (S.LOADING, S.ERROR), (S.LOADING, S.UNLOADED), (S.LOADED, S.UNLOADING),
           (S.LOADED, S.UNLOADED), (S.UNLOADING, S.UNLOADED), (S.UNLOADING, S.LOADED),
           (S.ERROR, S.LOADING), (S.ERROR, S.LOADED), (S.ERROR, S.UNLOADED)}


def test_the_transition_table_is_exactly_the_documented_one():
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == ALLOWED
    assert all(a is not b for a, b in itertools.chain(table))


@pytest.mark.parametrize("kwargs,expected", [
    ({"busy": True, "pinned": False, "ours": True, "held": False, "critical": True}, SERVING),
    ({"busy": False, "pinned": True, "ours": True, "held": False, "critical": True}, PINNED),
    ({"busy": False, "pinned": False, "ours": False, "held": False, "critical": True},
     NOT_OURS),
    ({"busy": False, "pinned": False, "ours": True, "held": True, "critical": False}, HELD),
    ({"busy": False, "pinned": False, "ours": True, "held": True, "critical": True}, None),
    ({"busy": False, "pinned": False, "ours": True, "held": False, "critical": False}, None),
])
def test_candidate_filter(kwargs, expected):
    assert blocker(**kwargs) == expected


async def test_residency_spares_a_fresh_model_until_the_waiting_load_waited_as_long(emulator):
    clock = ManualClock()
    mgr = await managed(emulator.url, clock=clock, eviction={"hold": 60})
    (await mgr.acquire(MODEL)).release()
    e = mgr.entry(MODEL)
    clock.advance(10)
    assert mgr.core.evictor.why_kept(e, critical=False) == HELD
    assert mgr.core.evictor.why_kept(e, critical=True) is None           # critical waives it
    assert mgr.core.evictor.why_kept(e, critical=False, requester_waited_s=60) is None
    clock.advance(51)
    assert mgr.core.evictor.why_kept(e, critical=False) is None
    await mgr.cleanup()


async def test_heat_decays_with_a_one_hour_half_life(emulator):
    clock = ManualClock()
    mgr = await managed(emulator.url, clock=clock)
    for _ in range(8):
        (await mgr.acquire(MODEL)).release()
    clock.advance(3600)
    candidate = mgr.core.evictor.candidate(mgr.entry(MODEL), clock.now())
    assert candidate.heat == pytest.approx(4.0)
    await mgr.cleanup()


async def test_idle_unloading_keeps_pinned_models(emulator):
    clock = ManualClock()
    mgr = await managed(emulator.url, clock=clock, models={MODEL: {"pinned": True}})
    await mgr.ensure_models_available([MODEL, "google/gemma-3-12b"])
    clock.advance(3 * 3600)
    assert await mgr.unload_idle_models() == ["google/gemma-3-12b"]
    await mgr.cleanup()


async def test_stream_without_usage_counts_estimated_tokens(emulator, proxy, http):
    emulator.state.faults.no_stream_usage = True          # LM Studio before 0.3.18
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 5, "stream": True, "messages": []}) as r:
        await r.read()
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        row = (await r.json())["models"][MODEL]
    assert row["completion_tokens"] == 5 and row["estimated_tokens"] == 5


async def test_an_upstream_silent_before_the_first_byte_is_a_504(emulator, make_proxy, http):
    proxy = await make_proxy(emulator.url, **{"upstream.read_timeout_s": 0.2})
    (await proxy.engine.acquire(MODEL)).release()
    emulator.state.faults.first_token_delay_s = 2.0
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": MODEL, "stream": True, "messages": []}) as r:
        body = await r.json()
    assert r.status == 504 and body["error"]["code"] == "upstream_timeout"
    assert proxy.engine.entry(MODEL).leases == 0
