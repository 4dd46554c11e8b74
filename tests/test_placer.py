"""The placer alone: each rule on a table of hosts (fleet/placer.py)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy.fleet.placer import HostView, place

GB = 1e9


def view(name: str, status: str = "unloaded", **kw) -> HostView:
    kw.setdefault("footprint_bytes", 8 * GB)
    kw.setdefault("ceiling_bytes", 40 * GB)
    return HostView(name, status, **kw)


CASES = [
    # (hosts, replicate_after_waiters, expected host, expected rule)
    pytest.param([view("a", free_bytes=50 * GB), view("b", "loaded")], 0, "b", "resident",
                 id="resident beats free room"),
    pytest.param([view("a", "loaded", in_flight=4, parallel=4),
                  view("b", "loaded", in_flight=1, parallel=4)], 0, "b", "resident",
                 id="a free slot beats a saturated copy"),
    pytest.param([view("a", "loaded", in_flight=9, parallel=4),
                  view("b", "loaded", in_flight=5, parallel=4)], 0, "b", "resident",
                 id="all saturated: fewest in flight"),
    pytest.param([view("a", "loaded", up=False), view("b", free_bytes=20 * GB)], 0, "b",
                 "free", id="a resident copy on a host that is down does not count"),
    pytest.param([view("a", "loading", waiters=3), view("b", free_bytes=50 * GB)], 0, "a",
                 "loading", id="join the load rather than start a second"),
    pytest.param([view("a", "loading", waiters=20), view("b", free_bytes=50 * GB)], 16, "b",
                 "replicate", id="a crowd past the threshold loads a copy where there is room"),
    pytest.param([view("a", "loading", waiters=15), view("b", free_bytes=50 * GB)], 16, "a",
                 "loading", id="below the threshold: join"),
    pytest.param([view("a", "loading", waiters=99), view("b", free_bytes=1 * GB)], 16, "a",
                 "loading", id="a crowd with no room elsewhere joins"),
    pytest.param([view("a", free_bytes=4 * GB, evict_cost_s=1.0),
                  view("b", free_bytes=9 * GB)], 0, "b", "free",
                 id="free room beats an eviction"),
    pytest.param([view("a", free_bytes=10 * GB, load_s=30.0),
                  view("b", free_bytes=10 * GB, load_s=5.0)], 0, "b", "free",
                 id="among hosts with room, the fastest to load"),
    pytest.param([view("a", free_bytes=10 * GB, load_s=5.0),
                  view("b", free_bytes=10 * GB, load_s=30.0, preferred=True)], 0, "b", "free",
                 id="the host the model's config names, when it has room"),
    pytest.param([view("a", free_bytes=10 * GB, failing=True),
                  view("b", free_bytes=2 * GB, evict_cost_s=3.0)], 0, "b", "evict",
                 id="a host whose load of it is backing off is not chosen for room"),
    pytest.param([view("a", evict_cost_s=10.0, load_s=2.0),
                  view("b", evict_cost_s=1.0, load_s=3.0)], 0, "b", "evict",
                 id="the cheapest victim set"),
    pytest.param([view("a", evict_cost_s=1.0, load_s=20.0),
                  view("b", evict_cost_s=3.0, load_s=2.0)], 0, "b", "evict",
                 id="victim cost plus the load time there"),
    pytest.param([view("a", evict_cost_s=None), view("b", footprint_bytes=90 * GB)], 0, "a",
                 "queue", id="nothing may go now: queue where it fits at all"),
    pytest.param([view("a", footprint_bytes=50 * GB), view("b", footprint_bytes=60 * GB)], 0,
                 None, "too_large", id="fits no host"),
    pytest.param([view("a", up=False, free_bytes=50 * GB)], 0, None, "down",
                 id="every host down"),
    pytest.param([view("a", up=False, ceiling_bytes=60 * GB, footprint_bytes=50 * GB),
                  view("b", footprint_bytes=50 * GB)], 0, None, "down",
                 id="only a host that is down could hold it: not too large"),
]


CASES += [
    pytest.param([view("a", "loading", up=False), view("b", free_bytes=20 * GB)], 0, "b",
                 "free", id="a load on a host that is down is not joined"),
    pytest.param([view("a", "loading", waiters=16), view("b", free_bytes=50 * GB)], 16, "b",
                 "replicate", id="a crowd of exactly the threshold loads a copy"),
    pytest.param([view("a", evict_cost_s=0.5, failing=True),
                  view("b", evict_cost_s=3.0)], 0, "b", "evict",
                 id="a host whose load of it is backing off is not chosen to evict"),
]


# The host a request failed on is left out: with no other, there is nothing to place on.
CASES.append(pytest.param([], 0, None, "down", id="no host left"))


@pytest.mark.parametrize("hosts,replicate,host,rule", CASES)
def test_each_rule_on_a_table(hosts, replicate, host, rule):
    p = place(hosts, random.Random(1), replicate_after_waiters=replicate)
    assert (p.host, p.rule) == (host, rule)


def test_ties_are_broken_at_random_so_racing_requests_spread():
    hosts = [view(n, free_bytes=20 * GB, load_s=5.0) for n in "abc"]
    rng = random.Random(7)
    picks = Counter(place(hosts, rng).host for _ in range(300))
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 60


def test_a_near_tie_in_load_time_is_a_tie_but_a_clear_gap_is_not():
    rng = random.Random(3)
    near = [view("a", free_bytes=20 * GB, load_s=10.0), view("b", free_bytes=20 * GB,
                                                              load_s=10.5)]
    assert {place(near, rng).host for _ in range(100)} == {"a", "b"}
    gap = [view("a", free_bytes=20 * GB, load_s=10.0), view("b", free_bytes=20 * GB,
                                                             load_s=14.0)]
    assert {place(gap, rng).host for _ in range(100)} == {"a"}


def test_a_queued_request_goes_to_a_host_whose_load_of_it_is_not_backing_off():
    hosts = [view("a", failing=True), view("b")]
    assert {place(hosts, random.Random(seed)).host for seed in range(50)} == {"b"}


def test_copies_with_a_free_slot_share_the_requests_at_random():
    hosts = [view(n, "loaded", in_flight=1, parallel=4) for n in "abc"]
    rng = random.Random(5)
    picks = Counter(place(hosts, rng).host for _ in range(300))
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 60
