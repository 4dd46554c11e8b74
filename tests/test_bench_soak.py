"""The soak with two replicas sharing a real Redis: traffic reaches both, each replica's RSS and
fds and Redis's key count are sampled through the run, and the verdict judges every series."""
from __future__ import annotations

import json

from bench import soak, soak_samples

from .redis_server import redis_server_binary


def test_a_short_soak_of_two_replicas_on_redis_samples_both_and_judges_flatness(
        tmp_path, capsys):
    redis_server_binary()       # skipped (or failed under REQUIRE_REDIS) without redis-server
    out = tmp_path / "soak.json"
    assert soak.main(["--replicas", "2", "--state", "redis", "--duration-s", "8",
                      "--concurrency", "6", "--idle-s", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["replicas"] == 2 and r["state"] == "redis"
    assert all(n > 0 for n in r["requests_per_replica"])
    assert sum(r["requests_per_replica"]) >= r["requests"] > 0
    timed = [s for s in r["samples"] if s["t_s"] is not None]
    assert len(timed) >= 10                       # every few seconds, scaled to the run
    assert [s["at"] for s in r["samples"][-2:]] == ["end", "idle"]
    for s in r["samples"]:
        assert len(s["replicas"]) == 2
        assert all(p["rss_mb"] > 10 and p["open_fds"] > 0 for p in s["replicas"])
        # the shared facts of one host and two replicas: a handful of keys, never one per
        # request (leases, locks and reservations lapse or are deleted)
        assert 1 <= s["redis_keys"] <= 20, s
    judged = {name for name, v in r["verdict"].items() if "flat" in v}
    assert judged == {"replica 1 rss_mb", "replica 1 open_fds", "replica 2 rss_mb",
                      "replica 2 open_fds", "redis_keys"}
    assert all(isinstance(r["verdict"][n]["flat"], bool) for n in judged)
    text = capsys.readouterr().out
    assert "| replica 2 open_fds |" in text and "| redis_keys |" in text
    assert ("verdict: flat" in text) == all(r["verdict"][n]["flat"] for n in judged)


def test_the_verdict_calls_growth_in_the_last_fifth_not_flat():
    def run(values: list[float]) -> dict:
        samples = [{"at": f"{t}s", "t_s": float(t), "redis_keys": k,
                    "replicas": [{"rss_mb": 50.0, "open_fds": 12, "connections": 1}]}
                   for t, k in enumerate(values)]
        return soak_samples.verdict(samples)
    steady = run([3, 5, 6, 6, 7, 6, 6, 7, 6, 6, 7])
    assert steady["redis_keys"]["flat"] and steady["replica 1 rss_mb"]["flat"]
    leaking = run([3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14])
    assert leaking["redis_keys"]["flat"] is False
    assert leaking["redis_keys"]["early_median"] == 6.5
    assert leaking["redis_keys"]["late_median"] == 13
