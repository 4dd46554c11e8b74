"""Admission in real operation: no head-of-line blocking, fail fast, order, first claim,
refusals that say what holds memory — against the emulator."""
from __future__ import annotations

import asyncio

import pytest

from proxy.cli import build_parser, resolve_config
from proxy.configload import replace_config
from proxy.emulator import CatalogModel
from proxy.engine.clock import ManualClock
from proxy.configload import load_config
from proxy.errors import InsufficientMemory, ProxyError, UpstreamUnreachable
from proxy.library import ModelMemoryManager
from proxy.upstream.base import Capabilities

from .fakes import GB, ScriptedBackend
from .test_engine import footprints, manager_for

X, Y, Z, W = "lab/x-12g", "lab/y-8g", "lab/z-3g", "lab/w-5g"
SIZES = {X: 12, Y: 8, Z: 3, W: 5}
CATALOG = [CatalogModel(key=k, size_bytes=int(g * GB), memory_bytes=int(g * GB),
                        load_time_s=1.0) for k, g in SIZES.items()]


class Loads:
    """A listener: the order models start loading, and load durations."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.durations: dict[str, float] = {}

    def on_state(self, model: str, old: str, new: str) -> None:
        if new == "loading":
            self.started.append(model)

    def on_load(self, model: str, duration_s: float, ok: bool) -> None:
        self.durations[model] = duration_s


@pytest.fixture
async def lab(make_emulator):
    return await make_emulator(catalog=CATALOG, capacity_bytes=64 * GB)


@pytest.fixture
async def lab_manager():
    """Managers on a 16 GB budget, cleaned up even when a test fails."""
    made = []

    async def make(url, **kw):
        kw.setdefault("models", footprints(SIZES))
        made.append(await manager_for(url, memory={"budget_gb": 16}, **kw))
        return made[-1]
    yield make
    for mgr in made:
        await mgr.cleanup()

async def waiting_for(mgr, key):
    """Start an acquire and return once the scheduler has looked at it and it still waits."""
    task = asyncio.create_task(mgr.acquire(key))
    while key not in mgr.core.scheduler.pending:
        await asyncio.sleep(0)
    await mgr.core.scheduler.settled()
    assert not task.done()
    return task


async def test_a_load_that_must_wait_never_blocks_one_that_fits(lab, lab_manager):
    mgr = await lab_manager(lab.url)
    serving = await mgr.acquire(X)                       # 12 of 16 GB, serving
    blocked = await waiting_for(mgr, Y)                  # 8 GB: waits for X to finish
    fits = await asyncio.wait_for(mgr.acquire(Z), 5)     # 3 GB fits beside X: goes at once
    assert mgr.get_loaded_models() == sorted([X, Z]) and not blocked.done()
    fits.release()
    serving.release()
    (await blocked).release()
    assert Y in mgr.get_loaded_models()


async def test_load_time_excludes_the_time_spent_waiting_for_memory(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock)
    loads = Loads()
    mgr.add_listener(loads)
    serving = await mgr.acquire(X)
    blocked = await waiting_for(mgr, Y)
    clock.advance(50.0)                                  # Y waits 50 s for X
    serving.release()
    (await blocked).release()
    assert loads.durations[Y] < 5.0                      # its load, not its wait


async def test_the_model_with_more_waiters_loads_first(lab, lab_manager):
    mgr = await lab_manager(lab.url)
    loads = Loads()
    mgr.add_listener(loads)
    serving = await mgr.acquire(X)
    one = [await waiting_for(mgr, Y)]
    three = [await waiting_for(mgr, W)] + [asyncio.create_task(mgr.acquire(W))
                                           for _ in range(2)]
    while mgr.core.scheduler.pending[W].waiters < 3:
        await asyncio.sleep(0)
    serving.release()
    for lease in await asyncio.gather(*three, *one):
        lease.release()
    assert loads.started[-2:] == [W, Y]                  # three requests served by one load


async def test_a_starving_load_gets_first_claim_on_memory(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock,
                            models=footprints({X: 6, Y: 12, W: 5}))
    loads = Loads()
    mgr.add_listener(loads)
    serving = await mgr.acquire(X)                       # 6 GB serving
    starving = await waiting_for(mgr, Y)                 # 12 GB cannot fit beside it
    clock.advance(mgr.config.eviction.fairness_s + 1)
    late = await waiting_for(mgr, W)                     # 5 GB fits now, but would leave Y
    assert W not in mgr.get_loaded_models()              # short once X goes: it waits
    serving.release()
    (await starving).release()
    (await late).release()
    assert loads.started[1:] == [Y, W]


async def test_behind_a_first_claim_a_load_that_spares_enough_still_goes(lab, lab_manager):
    clock = ManualClock()
    mgr = await lab_manager(lab.url, clock=clock)
    serving = await mgr.acquire(X)                       # 12 GB serving
    starving = await waiting_for(mgr, Y)                 # 8 GB: fits once X goes
    clock.advance(mgr.config.eviction.fairness_s + 1)
    small = await asyncio.wait_for(mgr.acquire(Z), 5)    # 3 GB: Y still fits after X
    small.release()
    serving.release()
    (await starving).release()


async def test_a_model_that_can_never_fit_is_refused_at_once_in_the_demo(make_emulator,
                                                                         make_proxy, http):
    emu = await make_emulator()                          # the demo catalogue
    config = resolve_config(build_parser().parse_args(["--demo"]), {})
    config = replace_config(config, {"upstream.url": emu.url, "storage.enabled": False})
    proxy = await make_proxy(emu.url, config=config)
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": "openai/gpt-oss-20b", "messages": []}) as resp:
        body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "model_too_large"
    assert "Retry-After" not in resp.headers
    message = body["error"]["message"]
    assert "14.5 GB" in message and "12.8 GB" in message
    assert "memory.max_memory_usage_percent" in message and "footprint_gb" in message
    assert emu.state.load_calls["openai/gpt-oss-20b"] == 0
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": "qwen/qwen3-4b", "max_tokens": 2, "messages": []}) as resp:
        assert resp.status == 200                        # the rest of the demo works


async def test_a_waiting_request_is_told_what_holds_memory(lab, lab_manager):
    mgr = await lab_manager(lab.url, eviction={"queue_timeout_s": 0.3})
    serving = await mgr.acquire(X)
    with pytest.raises(InsufficientMemory) as refused:
        await mgr.acquire(Y)
    assert f"'{X}' 12.0 GB (serving)" in refused.value.message
    assert refused.value.retry_after_s is not None
    serving.release()


async def test_blocked_only_by_pinned_models_is_refused_at_once(lab, lab_manager):
    mgr = await lab_manager(lab.url, models={**footprints(SIZES), X: {"footprint_gb": 12,
                                                                      "pinned": True}})
    (await mgr.acquire(X)).release()
    with pytest.raises(InsufficientMemory) as refused:
        await asyncio.wait_for(mgr.acquire(Y), 5)        # queue_timeout_s is 30 s here
    assert f"'{X}' 12.0 GB (pinned)" in refused.value.message
    assert mgr.queue_length == 0


async def test_blocked_by_a_model_that_is_not_ours_names_the_setting(lab, lab_manager):
    await lab.state.load(X)                              # loaded in LM Studio's GUI
    mgr = await lab_manager(lab.url)
    with pytest.raises(InsufficientMemory) as refused:
        await asyncio.wait_for(mgr.acquire(Y), 5)
    assert "(not ours)" in refused.value.message
    assert "eviction.manage_external" in refused.value.message


async def test_check_warns_about_configured_models_that_can_never_fit(tmp_path, capsys):
    from proxy.cli import main
    path = tmp_path / "proxy.yaml"
    path.write_text("memory: {sampler: budget, budget_gb: 16}\n"
                    "models: {big/model: {footprint_gb: 14}}\n")
    assert main(["--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "models.big/model.footprint_gb: 14 GB can never load" in out and "12.0 GB" in out


def test_residency_under_pressure_delays_but_never_refuses():
    """Four models of which one fits at a time, asked round-robin: with the real defaults
    (residency, queue timeout, fairness) every request is served within the queue timeout."""
    from bench.simulate import Variant, run_variant
    from bench.workload import Model, Request, Workload
    from proxy.config import EvictionConfig
    models = {f"m{i}": Model(f"m{i}", 10.0, 8.0) for i in range(4)}
    requests = [Request(3.0 * i, f"m{i % 4}", 2.0) for i in range(190)]
    defaults = EvictionConfig()
    result = run_variant(Workload("round-robin", models, requests), 16.0, Variant(
        "cost-aware", defaults.policy, hold=defaults.hold,
        queue_timeout_s=defaults.queue_timeout_s))
    assert result.failed_requests == 0
    assert result.delay_p99_s < defaults.queue_timeout_s


async def test_a_load_performed_by_its_requester_is_admitted_like_any_other(lab, lab_manager):
    mgr = await lab_manager(lab.url, models={**footprints(SIZES), "lab/huge": {
        "footprint_gb": 15}})
    (await mgr.acquire(X)).release()                     # 12 GB, cold and ours
    mgr.client_connection("sdk:tester", +1)              # the client stays connected
    load = await mgr.admit_load(Y, owner="sdk:tester")   # 8 GB: X is evicted first
    assert X not in mgr.get_loaded_models() and mgr.entry(Y).status.value == "loading"
    waiter = asyncio.create_task(mgr.acquire(Y))         # an OpenAI request meanwhile
    instance = await lab.state.load(Y)                   # the SDK client's own load
    load.loaded(instance.instance_id)
    (await waiter).release()
    assert mgr.entry(Y).owner == "sdk:tester"
    assert mgr.core.evictor.why_kept(mgr.entry(Y), critical=False) == "its SDK client is connected"
    assert await mgr.admit_load(Y, owner="sdk:tester") is None     # loaded already
    lab.state.catalog["lab/huge"] = lab.state.catalog[X]
    await mgr.reconcile()
    with pytest.raises(InsufficientMemory) as refused:     # the same refusals, at once
        await asyncio.wait_for(mgr.admit_load("lab/huge", owner="sdk:tester"), 5)
    assert f"'{Y}' 8.0 GB (its SDK client is connected)" in refused.value.message


async def test_a_failed_requester_load_fails_its_waiters_too(lab, lab_manager):
    from proxy.errors import ModelLoadFailed
    mgr = await lab_manager(lab.url)
    load = await mgr.admit_load(Z, owner="sdk:tester")
    waiter = asyncio.create_task(mgr.acquire(Z))
    await asyncio.sleep(0)
    load.failed("the client gave up")
    with pytest.raises(ModelLoadFailed):
        await waiter
    assert mgr.entry(Z).status.value == "error"


async def test_a_load_whose_victim_cannot_be_unloaded_fails_at_once_without_retrying(
        lab, lab_manager, caplog):
    """The server went away with X loaded: Y needs X's memory, and X's unload cannot reach the
    server. Y's request fails at once with that error, as a load would, instead of the
    admission pass failing and retrying without pause while the request waits."""
    mgr = await lab_manager(lab.url)
    await mgr.load_model(X)
    await lab.close()
    with pytest.raises(UpstreamUnreachable) as refused:
        await asyncio.wait_for(mgr.acquire(Y), 10)
    assert X in refused.value.message and Y in refused.value.message
    assert not mgr.core.scheduler.pending
    assert not [r for r in caplog.records if "admission pass failed" in r.getMessage()]


class BuggyUnload(ScriptedBackend):
    """A backend whose unload fails with an error no rule expects (a bug)."""

    async def unload(self, instance_id: str) -> None:
        raise RuntimeError("unload broke")


async def test_an_admission_pass_that_fails_is_retried_after_a_pause_not_at_once(caplog):
    """Each failed eviction puts its victim back and wakes the admission task: the retry waits
    its second all the same, so a bug logs once a second, not thousands of times."""
    backend = BuggyUnload({X: 12, Y: 8}, Capabilities(
        manages_loading=True, reports_memory=False, self_evicts=False, multi_instance=False,
        native_clients=False))
    mgr = ModelMemoryManager(config=load_config({
        "upstream": {"url": "http://127.0.0.1:9"},
        "memory": {"sampler": "budget", "budget_gb": 16, "min_free_memory_gb": 0,
                   "max_memory_usage_percent": 100},
        "eviction": {"hold": 0, "queue_timeout_s": 0.5}, "storage": {"enabled": False}}),
        upstream=backend)
    await mgr.start()
    try:
        await mgr.load_model(X)
        with pytest.raises(ProxyError):     # Y waits for X's memory until its deadline
            await asyncio.wait_for(mgr.acquire(Y), 10)
        failed = [r for r in caplog.records if "admission pass failed" in r.getMessage()]
        assert len(failed) == 1, len(failed)
    finally:
        await mgr.cleanup()


async def test_a_preload_whose_victim_cannot_be_unloaded_is_dropped(lab, lab_manager, caplog):
    mgr = await lab_manager(lab.url)
    await mgr.load_model(X)
    await lab.close()
    core = mgr.core
    assert core.scheduler.preload(core.entry(Y), value_s=1e6)    # worth any eviction
    await asyncio.wait_for(core.scheduler.settled(), 10)
    assert not core.scheduler.pending
    assert core.entry(X).status.value == "loaded"
    assert not [r for r in caplog.records if "admission pass failed" in r.getMessage()]
