"""Model groups against the emulator: together members load with each other, leave as a unit
and are never split while one serves; exclusive members are never resident at once."""
from __future__ import annotations

import asyncio

import pytest
import yaml

from proxy.cli import main
from proxy.configload import replace_config
from proxy.emulator import CatalogModel
from proxy.engine.clock import ManualClock
from proxy.engine.groups import GROUP_RETRY_S
from proxy.engine.lifecycle import ModelStatus
from proxy.engine.policy import GROUP_SERVING
from proxy.errors import GroupBusy
from proxy.library import ModelMemoryManager
from proxy.upstream.lmstudio import LMStudioUpstream

from .conftest import proxy_config
from .fakes import GB
from .sse import SseReader
from .test_engine import engine_config, footprints
from .test_scheduler import waiting_for

A, B, C, D, E = "lab/a-4g", "lab/b-4g", "lab/c-6g", "lab/d-5g", "lab/e-10g"
X, Y = "lab/x-6g", "lab/y-6g"
SIZES = {A: 4, B: 4, C: 6, D: 5, E: 10, X: 6, Y: 6}
CATALOG = [CatalogModel(key=k, size_bytes=int(g * GB), memory_bytes=int(g * GB),
                        load_time_s=0.0) for k, g in SIZES.items()]
PAIR = {"name": "pair", "members": [A, B], "policy": "together"}
SWAP = {"name": "swap", "members": [X, Y], "policy": "exclusive"}
RESIDENT = ("loading", "loaded", "unloading")


class Recorder:
    """A listener: evictions, preloads, and the most models of a set resident at once."""

    def __init__(self, watched: tuple[str, ...] = ()) -> None:
        self.evictions: list[tuple[str, str, str | None]] = []
        self.preloads: list[tuple[str, str]] = []
        self.watched = watched
        self.resident: set[str] = set()
        self.most_resident = 0
        self.changed = asyncio.Event()

    def on_evict(self, model: str, reason: str, for_model: str | None) -> None:
        self.evictions.append((model, reason, for_model))

    def on_preload(self, model: str, why: str) -> None:
        self.preloads.append((model, why))

    def on_state(self, model: str, old: str, new: str) -> None:
        if model in self.watched:
            (self.resident.add if new in RESIDENT else self.resident.discard)(model)
            self.most_resident = max(self.most_resident, len(self.resident))
        self.changed.set()

    async def until(self, predicate) -> None:
        async with asyncio.timeout(5):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def lab(make_emulator):
    return await make_emulator(catalog=CATALOG, capacity_bytes=64 * GB)


@pytest.fixture
async def manager():
    """Managers on a 16 GB budget with the given groups, cleaned up even when a test fails."""
    made = []

    async def make(url, groups, *, clock=None, **sections):
        sections.setdefault("models", footprints(SIZES))
        config = replace_config(engine_config(url, **sections), {"groups": groups})
        mgr = ModelMemoryManager(config=config, upstream=LMStudioUpstream(config.upstream),
                                 clock=clock, owns_upstream=True)
        made.append(mgr)
        await mgr.start()
        recorder = Recorder((X, Y))
        mgr.add_listener(recorder)
        return mgr, recorder
    yield make
    for mgr in made:
        await mgr.cleanup()


def loaded(mgr, key):
    return mgr.core.entry(key).status is ModelStatus.LOADED


def unloaded(mgr, key):
    """Not loaded, not loading, and no load of it waiting."""
    return mgr.core.entry(key).status is ModelStatus.UNLOADED and \
        key not in mgr.core.scheduler.pending


async def use(mgr, key):
    (await mgr.acquire(key)).release()


# -- together ------------------------------------------------------------------------------------
async def test_a_request_for_one_member_loads_the_others_in_the_background(lab, manager):
    mgr, rec = await manager(lab.url, [PAIR])
    await use(mgr, A)
    await rec.until(lambda: loaded(mgr, B))
    assert rec.preloads == [(B, "group:pair")]
    assert lab.state.load_calls[B] == 1 and rec.evictions == []


async def test_a_partner_loads_only_into_free_memory_and_is_tried_again_later(lab, manager):
    clock = ManualClock()
    mgr, rec = await manager(lab.url, [PAIR], clock=clock)
    await use(mgr, C)
    await use(mgr, D)                                  # 11 of 16 GB
    await use(mgr, A)                                  # 15: B would have to evict
    await mgr.core.scheduler.settled()
    assert unloaded(mgr, B) and loaded(mgr, C) and loaded(mgr, D)
    queued = lambda: mgr.get_memory_stats()["preload"]["queued"]     # noqa: E731
    assert queued() == 1 and rec.preloads == [] and rec.evictions == []   # tried, no room
    await mgr.unload_model(D)                          # room now
    await use(mgr, A)                                  # too soon to try again
    await mgr.core.scheduler.settled()
    assert unloaded(mgr, B) and queued() == 1
    clock.advance(GROUP_RETRY_S)
    await use(mgr, A)
    await rec.until(lambda: loaded(mgr, B))
    assert rec.preloads == [(B, "group:pair")]         # told once: when it loaded


async def test_the_policy_weighs_a_together_group_as_one_victim(lab, manager):
    """LRU alone would evict A (the least recently used model); as a unit A and B were used
    after C, so C goes."""
    clock = ManualClock()
    mgr, rec = await manager(lab.url, [PAIR], clock=clock, eviction={"policy": "lru"})
    await use(mgr, A)
    await rec.until(lambda: loaded(mgr, B))
    clock.advance(10)
    await use(mgr, C)                                  # 14 of 16 GB
    clock.advance(10)
    await use(mgr, B)
    await use(mgr, D)                                  # needs 3 GB more
    assert rec.evictions == [(C, "admission", D)]
    assert mgr.get_loaded_models() == sorted([A, B, D])


async def test_a_together_group_is_evicted_as_a_unit(lab, manager):
    clock = ManualClock()
    mgr, rec = await manager(lab.url, [PAIR], clock=clock, eviction={"policy": "lru"})
    await use(mgr, A)
    await rec.until(lambda: loaded(mgr, B))
    clock.advance(10)
    await use(mgr, C)
    await use(mgr, D)                                  # 3 GB short: A alone would do
    assert sorted(rec.evictions) == [(A, "admission", D), (B, "group:pair", D)]
    assert mgr.get_loaded_models() == sorted([C, D])


async def test_while_one_member_serves_no_member_is_a_victim(lab, manager):
    mgr, rec = await manager(lab.url, [PAIR])
    serving = await mgr.acquire(A)
    await rec.until(lambda: loaded(mgr, B))
    assert mgr.core.evictor.why_kept(mgr.core.entry(B), critical=False) == GROUP_SERVING
    blocked = await waiting_for(mgr, E)                # 10 GB: B alone would make room
    assert loaded(mgr, B) and rec.evictions == []
    serving.release()
    (await blocked).release()
    assert sorted(rec.evictions) == [(A, "admission", E), (B, "group:pair", E)]


async def test_a_request_arriving_during_an_eviction_keeps_its_whole_group(lab, manager):
    """Victims C, then the unit A+B; while C unloads, a request takes A: B stays too."""
    clock = ManualClock()
    mgr, rec = await manager(lab.url, [PAIR], clock=clock, eviction={"policy": "lru"},
                             memory={"budget_gb": 20})
    await use(mgr, C)
    clock.advance(10)
    await use(mgr, A)
    await rec.until(lambda: loaded(mgr, B))
    clock.advance(10)
    await use(mgr, D)                                  # 19 of 20 GB; E needs 9 more
    requests = []

    class RequestDuringUnload:
        def on_evict(self, model, reason, for_model):
            if model == C:
                requests.append(asyncio.create_task(mgr.acquire(A)))
    mgr.add_listener(RequestDuringUnload())
    (await mgr.acquire(E)).release()
    serving = await requests[0]
    assert loaded(mgr, A) and loaded(mgr, B)
    serving.release()


async def test_an_idle_timeout_counts_from_the_groups_last_use(lab, manager):
    clock = ManualClock()
    mgr, rec = await manager(lab.url, [PAIR], clock=clock,
                             models={**footprints(SIZES), B: {"footprint_gb": 4, "ttl_s": 60}})
    await use(mgr, A)
    await rec.until(lambda: loaded(mgr, B))
    clock.advance(50)
    await use(mgr, A)                                  # the unit is in use: B stays too
    clock.advance(50)
    assert await mgr.core.unload_idle_models() == []
    assert loaded(mgr, B)


async def test_a_member_is_not_idled_out_while_its_partner_serves(lab, manager):
    clock = ManualClock()
    mgr, rec = await manager(lab.url, [PAIR], clock=clock,
                             models={**footprints(SIZES), B: {"footprint_gb": 4, "ttl_s": 60}})
    serving = await mgr.acquire(A)
    await rec.until(lambda: loaded(mgr, B))
    clock.advance(100)                                 # a long generation
    assert await mgr.core.unload_idle_models() == []
    serving.release()


async def test_the_partner_of_the_model_to_load_is_spared_while_others_can_go(lab, manager):
    clock = ManualClock()
    mgr, rec = await manager(lab.url, [PAIR], clock=clock, eviction={"policy": "lru"})
    await use(mgr, C)
    await use(mgr, X)
    clock.advance(10)
    await use(mgr, B)                                  # 16 of 16 GB: A did not fit beside it
    await mgr.core.scheduler.settled()
    assert unloaded(mgr, A)
    clock.advance(10)
    await use(mgr, C)
    await use(mgr, X)                                  # B is now the least recently used
    await use(mgr, A)
    assert rec.evictions == [(C, "admission", A)]
    assert mgr.get_loaded_models() == sorted([A, B, X])


# -- exclusive -----------------------------------------------------------------------------------
async def test_an_exclusive_member_loads_after_the_other_drains(lab, manager):
    mgr, rec = await manager(lab.url, [SWAP])
    serving = await mgr.acquire(X)
    blocked = await waiting_for(mgr, Y)                # 12 of 16 GB would fit: the group waits
    assert loaded(mgr, X) and not loaded(mgr, Y)
    serving.release()
    (await blocked).release()
    assert rec.evictions == [(X, "group:swap", Y)]
    assert mgr.get_loaded_models() == [Y] and rec.most_resident == 1


async def test_an_exclusive_member_serving_past_the_deadline_refuses_naming_the_group(
        lab, manager):
    mgr, rec = await manager(lab.url, [SWAP], eviction={"queue_timeout_s": 0.3})
    serving = await mgr.acquire(X)
    with pytest.raises(GroupBusy) as refused:
        await mgr.acquire(Y)
    message = refused.value.message
    assert "exclusive group 'swap'" in message and f"'{X}'" in message
    assert "serving 1 request(s) after 0.3s (eviction.queue_timeout_s)" in message
    assert refused.value.retry_after_s == 1.0
    assert loaded(mgr, X) and lab.state.load_calls[Y] == 0
    serving.release()


async def test_a_pinned_exclusive_member_refuses_the_others_at_once(lab, manager):
    mgr, rec = await manager(lab.url, [SWAP], models={**footprints(SIZES),
                                                      X: {"footprint_gb": 6, "pinned": True}})
    await use(mgr, X)
    with pytest.raises(GroupBusy) as refused:
        await asyncio.wait_for(mgr.acquire(Y), 5)      # queue_timeout_s is 30 s here
    assert "pinned" in refused.value.message and refused.value.retry_after_s is None


async def test_a_together_partner_is_not_loaded_over_its_exclusive_rival(lab, manager):
    mgr, rec = await manager(lab.url, [{"name": "duo", "members": [A, X]}, SWAP])
    await use(mgr, Y)
    await use(mgr, A)                                  # X would push Y out: a guess never does
    await mgr.core.scheduler.settled()
    assert mgr.get_memory_stats()["preload"]["queued"] == 1 and rec.preloads == []
    assert loaded(mgr, Y) and unloaded(mgr, X) and rec.evictions == []


# -- configuration -------------------------------------------------------------------------------
def write(tmp_path, raw):
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


BUDGET = {"sampler": "budget", "budget_gb": 16, "min_free_memory_gb": 0}


def test_check_names_every_problem_of_the_groups(tmp_path, capsys):
    path = write(tmp_path, {
        "memory": BUDGET,
        "models": {A: {"footprint_gb": 10, "aliases": ["fast"]}, B: {"footprint_gb": 8}},
        "groups": [{"name": "pair", "members": [A, B]},
                   {"name": "pair", "members": ["fast", A, C], "policy": "exclusive"},
                   {"members": [D]},
                   {"name": "more", "members": [B, C]},
                   {"name": "apart", "members": [A, "fast", B], "policy": "exclusive"}]})
    assert main(["--config", path, "--check"]) == 2
    problems = [line.strip() for line in capsys.readouterr().err.splitlines()[1:]]
    assert problems == [
        "groups[1].name: 'pair' is also the name of groups[0]",
        "groups[1].members[1]: 'lab/a-4g' is listed twice ('fast' and 'lab/a-4g' name the "
        "same model)",
        "groups[2].name: required (it names the group in events and rows)",
        "groups[2].members: a group needs at least two models (got 1)",
        "groups[3].members: 'lab/b-4g' is already in the together group groups[0]; a model "
        "is in at most one together group (merge the two)",
        "groups[4].members[1]: 'fast' is listed twice ('lab/a-4g' and 'fast' name the same "
        "model)",
        "groups[4].members: 'lab/a-4g', 'lab/b-4g' are kept apart here (exclusive) and "
        "together by groups[0] ('pair'): they cannot be both",
        "groups[0]: 'pair' can never be resident at once: its members' "
        "models.<key>.footprint_gb add up to 18 GB (lab/a-4g 10 + lab/b-4g 8), more than "
        "models may take at once, 12.8 GB of 16.0 GB (memory.budget_gb); make it exclusive, or "
        "change those (models' share: memory.max_memory_usage_percent, "
        "memory.min_free_memory_gb)"]


def test_check_names_an_unknown_policy(tmp_path, capsys):
    path = write(tmp_path, {"groups": [{"name": "g", "members": [A, B], "policy": "apart"}]})
    assert main(["--config", path, "--check"]) == 2
    assert "groups[0].policy: must be one of together, exclusive (got 'apart')" in \
        capsys.readouterr().err


def test_a_group_that_fits_passes_check(tmp_path, capsys):
    path = write(tmp_path, {"memory": BUDGET, "models": footprints({A: 6, B: 6}),
                            "groups": [PAIR, {"name": "x", "members": [A, C],
                                              "policy": "exclusive"}]})
    assert main(["--config", path, "--check"]) == 0


@pytest.fixture
async def grouped(make_emulator, make_proxy):
    """A proxy on a 16 GB budget whose config source (for reloads) the test sets."""
    emu = await make_emulator(catalog=CATALOG, capacity_bytes=64 * GB)
    box = {"groups": [PAIR, SWAP]}

    def source():
        return proxy_config(emu.url, **{"memory.budget_gb": 16, "models": footprints(SIZES),
                                        "groups": box["groups"]})
    proxy = await make_proxy(emu.url, config=source(), app_kwargs={"config_source": source})
    proxy.box = box
    return proxy


async def chat(http, proxy, model):
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": model, "max_tokens": 2, "messages": []}) as r:
        await r.read()
        return r.status


async def rows(http, proxy):
    async with http.get(f"{proxy.url}/proxy/models") as r:
        return {m["model"]: m for m in (await r.json())["data"]}


async def test_proxy_models_shows_each_models_groups(grouped, http):
    models = await rows(http, grouped)
    assert models[A]["groups"] == [{"name": "pair", "policy": "together", "members": [A, B]}]
    assert models[Y]["groups"] == [{"name": "swap", "policy": "exclusive", "members": [X, Y]}]
    assert models[C]["groups"] == []


async def test_a_reload_with_a_group_that_can_never_fit_is_rejected(grouped, http):
    grouped.box["groups"] = [{"name": "big", "members": [C, E]}]      # 16 GB > 12.8
    async with http.post(f"{grouped.url}/proxy/reload") as r:
        status, error = r.status, (await r.json())["error"]
    assert status == 400 and error["code"] == "invalid_config"
    assert "groups[0]: 'big' can never be resident at once" in error["message"]
    assert (await rows(http, grouped))[C]["groups"] == []
    grouped.box["groups"] = [{"name": "big", "members": [C, E], "policy": "exclusive"}]
    async with http.post(f"{grouped.url}/proxy/reload") as r:
        assert r.status == 200
    assert (await rows(http, grouped))[C]["groups"] == [
        {"name": "big", "policy": "exclusive", "members": [C, E]}]


async def test_group_loads_and_evictions_say_so_on_the_event_stream(grouped, http):
    async with http.get(f"{grouped.url}/proxy/events") as r:
        events = SseReader(r)
        await events.next()
        assert await chat(http, grouped, A) == 200
        seen = await events.until(lambda e: e.type == "load" and e.data["model"] == B)
        assert [(e.data["model"], e.data["reason"]) for e in seen if e.type == "preload"] == \
            [(B, "group:pair")]
        assert await chat(http, grouped, X) == 200
        assert await chat(http, grouped, Y) == 200
        seen = await events.until(lambda e: e.type == "evict" and e.data["model"] == X)
    assert [(e.data["model"], e.data["reason"], e.data["for_model"]) for e in seen
            if e.type == "evict"] == [(A, "admission", X), (B, "group:pair", X),   # 14 > 12.8
                                      (X, "group:swap", Y)]
