"""The eviction benchmark runs the real engine on virtual time and its bounds hold."""
from __future__ import annotations

import json

from bench.eviction import ALL_POLICIES, main


def test_explicit_stream_replay_writes_every_policy_and_the_bound_holds(tmp_path, capsys):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("model,size_gb,load_s\na,8,6\nb,6,5\nc,4,3\n")
    requests = tmp_path / "requests.csv"
    pattern = ["a", "b", "a", "c", "b", "a", "c", "c", "b", "a"] * 6
    requests.write_text("t_s,model,prompt_tokens,completion_tokens\n" + "".join(
        f"{i * 40.0},{m},100,50\n" for i, m in enumerate(pattern)))
    out = tmp_path / "runs.json"
    assert main(["--requests", str(requests), "--catalog", str(catalog), "--budget-gb", "12",
                 "--jobs", "1", "--json", str(out)]) == 0
    runs = {r["policy"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == set(ALL_POLICIES)
    assert [p for p, r in runs.items() if r["default"]] == ["cost-aware"]
    bound = runs["offline-bound"]["load_seconds"]
    optimum = runs["offline-optimal"]["load_seconds"]
    assert runs["offline-bound"]["cold_loads"] is None and runs["offline-optimal"]["note"] == "optimal"
    assert bound - 1e-6 <= optimum          # the LP relaxes the optimum's integer program
    for name, r in runs.items():
        if name not in ("offline-bound", "offline-optimal", "lru-count"):   # lru-count may
            assert r["load_seconds"] >= bound - 1e-6, name                # exceed the budget
            assert r["failed_requests"] == 0 and r["peak_resident_gb"] <= 12
    assert runs["lru"]["cold_loads"] > 3                   # the budget forces reloads
    assert "| policy |" in capsys.readouterr().out
