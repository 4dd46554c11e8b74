"""Eviction policies are pure: frozen candidates in, victims out."""
from __future__ import annotations

import pytest

from proxy.engine.policy import Candidate, select_victims

GB = 1_000_000_000
NOW = 10_000.0


def cand(key, gb=4.0, idle_s=100.0, **kw):
    return Candidate(key=key, footprint_bytes=gb * GB, last_used_s=NOW - idle_s, **kw)


def test_lru_takes_least_recently_used_first():
    c = [cand("a", idle_s=10), cand("b", idle_s=500), cand("c", idle_s=50)]
    assert select_victims("lru", c, 4 * GB, NOW) == ("b",)
    assert select_victims("lru", c, 6 * GB, NOW) == ("b", "c")


def test_nothing_is_chosen_when_the_need_cannot_be_met():
    c = [cand("a"), cand("b")]
    assert not select_victims("lru", c, 9 * GB, NOW)
    assert select_victims("lru", c, 0, NOW) == ()


def test_redundant_victims_are_spared():
    # LRU order is small-then-big, but the big one alone frees enough: keep the small one.
    c = [cand("small", gb=1, idle_s=900), cand("big", gb=8, idle_s=800)]
    assert select_victims("lru", c, 6 * GB, NOW) == ("big",)


def test_priority_policy_keeps_high_priority_models():
    c = [cand("important", idle_s=900, priority=10), cand("minor", idle_s=10, priority=1)]
    assert select_victims("priority", c, 4 * GB, NOW) == ("minor",)


def test_cost_aware_prefers_evicting_cheap_to_reload_and_rarely_used():
    cheap = cand("cheap", gb=4, reload_s=1.0, heat=5)
    costly = cand("costly", gb=4, reload_s=20.0, heat=5)
    assert select_victims("cost-aware", [cheap, costly], 4 * GB, NOW) == ("cheap",)
    rare = cand("rare", reload_s=10.0, heat=1, idle_s=60)
    popular = cand("popular", reload_s=10.0, heat=40, idle_s=60)
    assert select_victims("cost-aware", [rare, popular], 4 * GB, NOW) == ("rare",)


def test_cost_aware_relieves_pressure_by_cost_per_gigabyte_held():
    big = cand("big", gb=16, reload_s=10.0, heat=4)
    small = cand("small", gb=2, reload_s=4.0, heat=4)
    assert select_victims("cost-aware", [big, small], 2 * GB, NOW, partial=True) == ("big",)
    # Making room for a load, the cheapest set that covers the shortfall goes.
    assert select_victims("cost-aware", [big, small], 2 * GB, NOW) == ("small",)


def test_cost_aware_lets_a_once_popular_model_cool_down():
    # Heat decays by the hour: a model busy long ago but idle since goes before a recent one.
    cooled = cand("cooled", reload_s=10.0, heat=0.01, idle_s=4 * 3600)
    recent = cand("recent", reload_s=10.0, heat=1.0, idle_s=120)
    assert select_victims("cost-aware", [cooled, recent], 4 * GB, NOW) == ("cooled",)


# Seconds of idleness under the recency floor say nothing: heat and reload cost decide there.
@pytest.mark.parametrize("keep, evict", [
    # just used once vs used 10 s ago but asked for all hour: the one-off goes
    (dict(key="steady", idle_s=10, heat=30, reload_s=5.0),
     dict(key="one-off", idle_s=1, heat=0.5, reload_s=5.0)),
    # used 1 s ago and cheap to reload vs used 3 s ago and costly: the cheap one goes
    (dict(key="costly", idle_s=3, heat=2, reload_s=5.0),
     dict(key="cheap", idle_s=1, heat=2, reload_s=2.0)),
    # beyond the floor recency still counts: same heat, the long-idle one goes
    (dict(key="recent", idle_s=13, heat=2, reload_s=5.0),
     dict(key="stale", idle_s=600, heat=2, reload_s=5.0)),
])
def test_cost_aware_recency_has_a_floor(keep, evict):
    c = [cand(**keep), cand(**evict)]
    assert select_victims("cost-aware", c, 4 * GB, NOW) == (evict["key"],)


def test_priority_weighs_into_cost_aware():
    low = cand("low", reload_s=10.0, heat=3, priority=2)
    high = cand("high", reload_s=10.0, heat=3, priority=9)
    assert select_victims("cost-aware", [high, low], 4 * GB, NOW) == ("low",)


@pytest.mark.parametrize("policy", ["lru", "priority", "cost-aware"])
def test_every_policy_is_deterministic_and_input_order_free(policy):
    c = [cand(k, gb=g, idle_s=i, heat=u, reload_s=r) for k, g, i, u, r in
         [("a", 2, 10, 1, 3), ("b", 6, 300, 4, 9), ("c", 3, 40, 2, 1), ("d", 5, 900, 9, 7)]]
    first = select_victims(policy, c, 7 * GB, NOW)
    assert first == select_victims(policy, list(reversed(c)), 7 * GB, NOW)
    assert sum(x.footprint_bytes for x in c if x.key in first) >= 7 * GB


def test_partial_selection_frees_what_it_can_when_relieving_pressure():
    c = [cand("a", gb=2), cand("b", gb=3)]
    assert not select_victims("lru", c, 10 * GB, NOW)
    assert set(select_victims("lru", c, 10 * GB, NOW, partial=True)) == {"a", "b"}


def test_every_configurable_policy_has_a_value_function():
    from proxy.config import POLICIES
    from proxy.engine.policy import VALUE_FUNCTIONS
    assert set(VALUE_FUNCTIONS) == set(POLICIES)
