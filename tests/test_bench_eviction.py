"""The eviction benchmark runs the real engine on virtual time and its bounds hold."""
from __future__ import annotations

import json

from bench.eviction import ALL_POLICIES, main


def replay(tmp_path, catalog: str, requests: str, *args: str) -> list[dict]:
    """The bench's runs over an explicit stream, its catalogue and requests given as CSV."""
    (tmp_path / "catalog.csv").write_text(catalog)
    (tmp_path / "requests.csv").write_text(requests)
    out = tmp_path / "runs.json"
    assert main(["--requests", str(tmp_path / "requests.csv"), "--catalog",
                 str(tmp_path / "catalog.csv"), "--jobs", "1", "--json", str(out), *args]) == 0
    return json.loads(out.read_text())["runs"]


def test_explicit_stream_replay_writes_every_policy_and_the_bound_holds(tmp_path, capsys):
    pattern = ["a", "b", "a", "c", "b", "a", "c", "c", "b", "a"] * 6
    runs = {r["policy"]: r for r in replay(
        tmp_path, "model,size_gb,load_s\na,8,6\nb,6,5\nc,4,3\n",
        "t_s,model,prompt_tokens,completion_tokens\n" + "".join(
            f"{i * 40.0},{m},100,50\n" for i, m in enumerate(pattern)), "--budget-gb", "12")}
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


def test_the_oracle_preloads_exactly_the_models_requested_next(tmp_path):
    runs = {(r["policy"], r["prediction"]): r for r in replay(
        tmp_path, "model,size_gb,load_s\na,4,3\nb,4,3\nc,4,3\nnever,4,3\n",
        "t_s,model\n10,a\n20,b\n30,c\n100,a\n200,b\n300,c\n", "--budget-gb", "16",
        "--policy", "lru,cost-aware,offline-belady", "--prediction", "off,oracle")}
    assert runs[("lru", "off")]["delayed_requests"] == 3    # the three first requests
    # p99 over all six requests is the worst of the three loads' waits (3 s each).
    assert runs[("lru", "off")]["delay_p99_all_s"] == runs[("lru", "off")]["delay_p99_s"] == 3.0
    for policy in ("cost-aware", "offline-belady"):
        oracle = runs[(policy, "oracle")]
        # a, b and c were each loaded once, before their first request; `never` never was.
        assert (oracle["preloads"], oracle["useful_preloads"], oracle["wasted_preloads"]) == \
            (3, 3, 0), policy
        assert oracle["cold_loads"] == 3 and oracle["delayed_requests"] == 0, policy
        assert oracle["delay_p99_all_s"] == 0.0 and oracle["delay_p99_s"] is None, policy
        assert runs[(policy, "off")]["delayed_requests"] == 3, policy
    assert runs[("lru", "off")]["prediction"] == "off"     # lru is the plain baseline


def test_the_predictors_ceiling_preloads_nothing_for_a_models_first_request(tmp_path):
    """oracle-seen knows the future but for each model's first request: a, b and c asked for
    twice each, in memory for all, wait for their first loads as without preloading (a's second
    request, a second after its first, too: its preload would have been due before a was ever
    asked for), where the full oracle preloads all three in time."""
    runs = {r["prediction"]: r for r in replay(
        tmp_path, "model,size_gb,load_s\na,4,3\nb,4,3\nc,4,3\n",
        "t_s,model\n10,a\n11,a\n20,b\n30,c\n100,a\n200,b\n300,c\n", "--budget-gb", "16",
        "--policy", "cost-aware", "--prediction", "oracle,oracle-seen")}
    seen = runs["oracle-seen"]
    assert (seen["preloads"], seen["cold_loads"], seen["delayed_requests"]) == (0, 3, 4)
    assert seen["delay_total_s"] == 11.0
    assert seen["delay_tail_mean_s"] == 3.0     # the slowest 1 % of seven: the slowest one
    assert (runs["oracle"]["preloads"], runs["oracle"]["delayed_requests"]) == (3, 0)
    assert runs["oracle"]["delay_tail_mean_s"] == 0.0


def test_an_oracle_preload_waits_for_a_requested_load_and_counts_what_it_wasted(tmp_path):
    """Memory for one model: the oracle's preload of b, due while a serves, is dropped rather
    than evict a busy model; b's request then loads it."""
    (run,) = replay(tmp_path, "model,size_gb,load_s\na,4,3\nb,4,3\n",
                    "t_s,model,prompt_tokens,completion_tokens\n"
                    "10,a,10,6000\n20,b,10,10\n",    # a serves for 6000/150 = 40 s
                    "--budget-gb", "4", "--policy", "cost-aware", "--prediction", "oracle")
    assert run["preloads"] == 1 and run["useful_preloads"] == 1     # a, before its request
    assert run["cold_loads"] == 2 and run["delayed_requests"] == 1  # b waited for a to finish
    assert run["peak_resident_gb"] <= 4


def test_runs_count_delays_per_model_and_pin_what_they_are_told_to(tmp_path):
    """Memory for one of two models, asked for in turn: every request after the first two waits
    for a reload under lru; with `a` pinned, `b` cannot load at all and `a` never waits."""
    runs = {r["policy"]: r for r in replay(
        tmp_path, "model,size_gb,load_s\na,4,3\nb,4,3\n",
        "t_s,model\n" + "".join(f"{i * 100},{'ab'[i % 2]}\n" for i in range(6)),
        "--budget-gb", "6", "--policy", "lru,cost-aware", "--pin", "a")}
    assert runs["lru"]["pinned"] == [] and runs["lru"]["delayed_by_model"] == {"a": 3, "b": 3}
    pinned = runs["cost-aware"]
    assert pinned["pinned"] == ["a"] and pinned["delayed_by_model"] == {"a": 1}
    assert pinned["failed_requests"] == 3


def test_the_tail_mean_is_the_mean_of_the_slowest_hundredth_rounded_up():
    from bench.eviction import _label
    from bench.simulate import tail_mean
    delays = [0.0] * 148 + [4.0, 2.0]          # 1 % of 150 is 1.5: the slowest two
    assert tail_mean(delays) == 3.0 and tail_mean([5.0]) == 5.0 and tail_mean([]) is None
    labels = {_label({"policy": "lru", "prediction": p}) for p in ("oracle", "oracle-seen")}
    assert len(labels) == 2


def test_a_preload_still_loading_when_the_replay_ends_is_stopped_with_the_engine(tmp_path):
    """b always follows a, and c takes all memory between: the last a's preload of b is still
    loading (30 s) when the replay ends. The engine is shut down before its loop closes, so
    nothing runs on a closed loop (an error under this suite's warnings-as-errors)."""
    rows = "".join(f"{i * 600 + 10},a\n{i * 600 + 15},b\n{i * 600 + 300},c\n" for i in range(6))
    runs = replay(tmp_path, "model,size_gb,load_s\na,4,1\nb,4,30\nc,8,1\n",
                  "t_s,model\n" + rows + "4000,a\n", "--budget-gb", "8",
                  "--policy", "cost-aware", "--prediction", "on")
    assert runs[0]["preloads"] >= 1 and runs[0]["failed_requests"] == 0
