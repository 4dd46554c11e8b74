"""The fleet benchmark replays through the real fleet on virtual time, every strategy is
reported, and what must hold of any placement holds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.fleet import main, render
from bench.fleet_micro import main as micro_main
from bench.fleet_sim import REFERENCES, STRATEGIES, HostSpec, static_assignment
from bench.workload import Model, Workload


def stream(tmp_path) -> tuple[str, str]:
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("model,size_gb,load_s\nbig,10,8\nmid,6,5\nsmall,3,3\ntiny,2,2\n")
    requests = tmp_path / "requests.csv"
    pattern = ["big", "mid", "small", "big", "tiny", "mid", "small", "small", "big", "tiny"] * 5
    requests.write_text("t_s,model,prompt_tokens,completion_tokens\n" + "".join(
        f"{i * 30.0},{m},100,300\n" for i, m in enumerate(pattern)))
    return str(requests), str(catalog)


def test_every_strategy_is_replayed_on_each_layout_and_the_invariants_hold(tmp_path, capsys):
    requests, catalog = stream(tmp_path)
    out = tmp_path / "runs.json"
    assert main(["--requests", requests, "--catalog", catalog, "--layout", "two,three",
                 "--rounds", "2", "--jobs", "1", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    for layout in ("two", "three"):
        mine = [r for r in runs if r["layout"] == layout]
        assert {r["strategy"] for r in mine} == set(STRATEGIES + REFERENCES)
        by = {(r["strategy"], r["seed"]): r for r in mine}
        assert {s for s, seed in by if seed == 2} == {"placer", "least-busy"}  # random: rounds
        for r in mine:
            assert r["requests"] == 50 and r["refused"] == 0, r["strategy"]
            assert r["loads"] == sum(r["per_host_loads"].values())
            # every model is requested, so each is loaded at least once somewhere
            assert r["loads"] >= 4 and r["load_seconds"] >= 8 + 5 + 3 + 2
            assert r["delay_total_s"] >= 0 and r["duplicates_max"] >= 0
            for h in r["hosts"]:
                assert r["per_host_loads"].get(h["name"], 0) >= 0
        for s in ("hash", "static", "single-host", "placer", "oracle", "oracle-place"):
            # one copy per model: only rotation and least-busy spread a model over hosts
            assert all(by[(s, seed)]["duplicate_loads"] == 0
                       for (name, seed) in by if name == s), s
        for s in ("single-host", "single-oracle", "single-mean", "single-slowest"):
            assert by[(s, 1)]["per_host_loads"].keys() == {"single"}
        # the same loads at the fastest, the mean and the slowest speed: load seconds in order
        fast, mean, slow = (by[(s, 1)]["load_seconds"] for s in
                            ("single-host", "single-mean", "single-slowest"))
        assert fast < mean < slow
        assert by[("round-robin", 1)]["duplicate_loads"] > 0   # it loads a model everywhere
    text = capsys.readouterr().out
    assert "placer ÷ best baseline" in text and "placer ÷ single host" in text
    for s in STRATEGIES + REFERENCES:
        assert f"| {s} |" in text
    assert "| oracle ÷ single host, Belady |" in text and "rows ≤ 1.3" in text
    assert render(runs) in text


def test_static_binds_the_largest_models_first_where_most_memory_is_left():
    models = {k: Model(k, gb, 1.0) for k, gb in
              (("a", 10.0), ("b", 8.0), ("c", 6.0), ("d", 3.0), ("e", 2.0))}
    w = Workload("w", models, [])
    hosts = [HostSpec("pc", 12.0), HostSpec("mac", 9.0), HostSpec("closet", 7.0)]
    # a → pc (2 left), b → mac (1 left), c → closet (1 left), d → pc? no: every host has
    # under 3 left; the most is pc's 2 → pc, then e → mac/closet tie (1): the first listed.
    assert static_assignment(w, hosts) == {"a": "pc", "b": "mac", "c": "closet", "d": "pc",
                                           "e": "mac"}


def test_the_micro_benchmark_reports_the_fleet_beside_one_engine(capsys):
    assert micro_main(["--models", "20", "--hosts", "3", "--requests", "200",
                       "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    assert "| one EngineCore |" in text and "| Fleet of 3 hosts |" in text


def oracle_run(x_back_at_s: float) -> dict[str, int]:
    from bench.fleet_sim import run_strategy
    from bench.workload import Request
    models = {"x": Model("x", 8.0, 6.0), "y": Model("y", 6.0, 5.0)}
    w = Workload("w", models, [Request(0.0, "x", 1.0), Request(100.0, "y", 1.0),
                               Request(x_back_at_s, "x", 1.0)])
    hosts = [HostSpec("pc", 10.0, 1.0), HostSpec("mac", 10.0, 2.0)]
    return run_strategy(w, hosts, "oracle", 1).per_host_loads


def test_the_oracle_evicts_on_the_fast_host_only_what_is_not_needed_soon():
    # y: on pc it must evict x (8 of 10 GB). x back within the horizon: its reload (6 s) + y's
    # load there (5 s) costs more than y's load on the slower mac (10 s) with room.
    assert oracle_run(200.0) == {"pc": 1, "mac": 1}
    # x back only after the horizon: evicting it costs nothing now; y loads on pc, then x again.
    assert oracle_run(1000.0) == {"pc": 3, "mac": 0}


def test_the_micro_benchmark_runs_a_baseline_checkout_side_by_side(tmp_path, capsys):
    here = Path(__file__).resolve().parents[1]
    out = tmp_path / "micro.json"
    assert micro_main(["--models", "10", "--hosts", "2", "--requests", "50", "--rounds", "2",
                       "--baseline", str(here), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"one EngineCore", "Fleet of 2 hosts"}
    for r in rows.values():    # one round each way, each process's own median of 3
        assert len(r["baseline_rounds_us"]) == len(r["this_rounds_us"]) == 2
        assert r["ratio"] == r["this_us"] / r["baseline_us"]
    assert "| Fleet of 2 hosts |" in capsys.readouterr().out


def test_the_micro_benchmark_refuses_a_baseline_that_is_no_checkout(tmp_path, capsys):
    with pytest.raises(SystemExit):
        micro_main(["--baseline", str(tmp_path)])
    assert "not a checkout of this project" in capsys.readouterr().err
