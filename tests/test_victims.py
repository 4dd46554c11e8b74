"""cost-aware's victims for a load: the lowest cost per GB first, unless the cheapest cover of
the shortfall by expected reload seconds more than halves that cost. Pure choices, and a
scripted replay on the engine's virtual clock."""
from __future__ import annotations

import asyncio

from proxy.engine.policy import (COVER_GAIN_MIN, COVER_MAX_CANDIDATES, Candidate, cost_aware_cost,
                                 select_victims)

from .test_waits import run, use

GB = 1_000_000_000
NOW = 10_000.0


def cand(key, gb, reload_s, idle_s=100.0, heat=1.0, **kw):
    return Candidate(key=key, footprint_bytes=gb * GB, last_used_s=NOW - idle_s,
                     reload_s=reload_s, heat=heat, **kw)


def test_a_small_model_that_covers_the_shortfall_goes_before_a_big_one_cheaper_per_gb():
    small = cand("small", 3, reload_s=3.0)    # 1.0 reload s per GB
    big = cand("big", 9, reload_s=8.0)        # 0.89 reload s per GB, but 8 s to reload
    assert select_victims("cost-aware", [small, big], 2 * GB, NOW) == ("small",)


def test_the_per_gb_choice_stays_unless_the_cover_more_than_halves_its_cost():
    """It frees more memory for its price, which the next load and preloads use."""
    small = cand("small", 3, reload_s=3.0)
    for big_reload_s, victims in ((5.0, ("big",)), (5.9, ("big",)), (6.5, ("small",))):
        big = cand("big", 9, reload_s=big_reload_s)     # cheaper per GB than small each time
        assert select_victims("cost-aware", [small, big], 2 * GB, NOW) == victims
    assert COVER_GAIN_MIN == 2.0


def test_a_big_model_goes_when_the_small_ones_that_cover_cost_more_in_all():
    smalls = [cand(f"s{i}", 3, reload_s=3.0) for i in range(3)]
    big = cand("big", 9, reload_s=8.0)        # 8 s < three reloads of 3 s
    assert select_victims("cost-aware", [*smalls, big], 8 * GB, NOW) == ("big",)
    assert cost_aware_cost(big, NOW) < sum(cost_aware_cost(c, NOW) for c in smalls)


def test_a_pipelines_next_step_is_kept_by_the_cover():
    coder = cand("coder", 8, reload_s=6.0, idle_s=600.0, p_due=0.9)
    other = cand("other", 8, reload_s=6.0, idle_s=600.0)
    assert select_victims("cost-aware", [coder, other], 4 * GB, NOW) == ("other",)


def test_many_candidates_are_covered_from_the_cheapest_and_beyond_them_when_needed():
    many = [cand(f"m{i:04d}", 0.1, reload_s=1.0 + i / 100) for i in range(1000)]
    picked = select_victims("cost-aware", many, 0.3 * GB, NOW)
    assert picked == ("m0000", "m0001", "m0002")
    # More than the COVER_MAX_CANDIDATES cheapest hold: the choice still frees enough.
    need = (COVER_MAX_CANDIDATES + 5) * 0.1 * GB
    picked = select_victims("cost-aware", many, need, NOW)
    assert sum(1 for _ in picked) * 0.1 * GB >= need - 1



def test_a_cover_of_exactly_half_the_cost_leaves_the_per_gb_choice():
    """The gain must exceed COVER_GAIN_MIN: at exactly half the cost, per GB stays."""
    small = cand("small", 3, reload_s=3.0)
    big = cand("big", 9, reload_s=6.0)
    assert COVER_GAIN_MIN * cost_aware_cost(small, NOW) == cost_aware_cost(big, NOW)
    assert select_victims("cost-aware", [small, big], 2 * GB, NOW) == ("big",)


def test_the_cover_always_frees_the_shortfall_whatever_its_units_round_to():
    # Two 0.05 GB models for a 0.1 GB shortfall: one unit each after rounding, yet both go.
    tiny = [cand("t1", 0.05, reload_s=1.0), cand("t2", 0.05, reload_s=2.0)]
    assert select_victims("cost-aware", tiny, 0.1 * GB, NOW) == ("t1", "t2")
    # 0.15 GB models round down to one unit: the cover finds none for 0.25 GB; per GB does.
    pair = [cand("p1", 0.15, reload_s=1.0), cand("p2", 0.15, reload_s=2.0)]
    assert select_victims("cost-aware", pair, 0.25 * GB, NOW) == ("p1", "p2")


def test_a_large_shortfall_in_coarser_units_still_finds_the_cheap_cover():
    """Past 40 GB the cover's unit grows with the shortfall (COVER_MAX_UNITS of them)."""
    small = cand("small", 51, reload_s=3.0)    # covers 50 GB alone, at 3 s
    big = cand("big", 200, reload_s=8.0)       # cheaper per GB, 8 s
    assert select_victims("cost-aware", [small, big], 50 * GB, NOW) == ("small",)


def test_past_the_candidate_cap_the_cover_looks_at_the_cheapest_by_cost_and_by_cost_per_gb():
    many = COVER_MAX_CANDIDATES + 12
    # Cheap per GB but dear in all: only the ranking by cost sees the 3 GB model that covers.
    bigs = [cand(f"big{i:02d}", 9, reload_s=8.0) for i in range(many)]
    small = cand("small", 3, reload_s=3.0)
    assert select_victims("cost-aware", [*bigs, small], 2 * GB, NOW) == ("small",)
    # Cheap in all but dear per GB: tiny ones fill the ranking by cost; only the ranking per GB
    # sees mid, which covers 8 GB at 6 s, not huge (the per-GB choice, 40 s).
    tinies = [cand(f"tiny{i:02d}", 0.1, reload_s=1.0) for i in range(many)]
    mid = cand("mid", 9, reload_s=6.0)
    huge = cand("huge", 80, reload_s=40.0)
    assert select_victims("cost-aware", [*tinies, mid, huge], 8 * GB, NOW) == ("mid",)

def test_the_cover_waits_less_than_evicting_by_cost_per_gb():
    """small (3 GB, 3 s) and big (9 GB, 8 s) fill 12 GB, used alike; a 2 GB model arrives,
    then both are asked for again. Evicting small for it costs a 3 s reload; evicting big (the
    lower cost per GB) would cost 8 s."""
    async def script(mgr, loop):
        await use(mgr, loop, "small")
        await use(mgr, loop, "big")
        await asyncio.sleep(100.0)
        waits = [await use(mgr, loop, "new")]
        after_new = mgr.core.registry.loaded()
        waits += [await use(mgr, loop, "big"), await use(mgr, loop, "small")]
        return after_new, [round(w, 3) for w in waits]
    after_new, waits = run({"small": (3, 3.0), "big": (9, 8.0), "new": (2, 2.0)}, 12, script,
                           hold="off", prediction="off")
    assert sorted(after_new) == ["big", "new"]
    assert waits == [2.0, 0.0, 3.0]


def test_the_bench_runs_the_previous_rule_beside_the_cover(tmp_path, capsys):
    from bench.eviction import main
    import json
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("model,size_gb,load_s\nsmall,3,3\nbig,9,8\nnew,2,2\n")
    requests = tmp_path / "requests.csv"
    pattern = ["big", "small", "new", "big", "small"] * 4
    requests.write_text("t_s,model\n" + "".join(f"{i * 100.0},{m}\n"
                                                for i, m in enumerate(pattern)))
    out = tmp_path / "runs.json"
    assert main(["--requests", str(requests), "--catalog", str(catalog), "--budget-gb", "12",
                 "--policy", "lru,cost-aware,cost-aware-greedy,cost-aware-cover", "--jobs", "1",
                 "--json", str(out)]) == 0
    runs = {r["policy"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"lru", "cost-aware", "cost-aware-greedy", "cost-aware-cover"}
    assert runs["cost-aware-greedy"]["hold"] == runs["cost-aware-cover"]["hold"] == \
        runs["cost-aware"]["hold"]
    # At each `new`, big (idle longer, cheaper per GB) or small must go; big is asked for next.
    assert runs["cost-aware-cover"]["delay_total_s"] < \
        runs["cost-aware-greedy"]["delay_total_s"]
    printed = capsys.readouterr().out
    assert "cost-aware-greedy" in printed and "cost-aware-cover" in printed
