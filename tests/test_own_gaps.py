"""A model's own gaps in cost-aware's rate: when at least OWN_WAIT_MIN_GAPS of its past gaps
were longer than its idle time so far, the mean wait they leave ahead replaces the idle time if
it is shorter, so a model used every 40 s is not taken for idle 30 s into its gap."""
from __future__ import annotations

import asyncio
import math

import pytest

from proxy.config import GroupConfig
from proxy.engine.learner import OWN_WAIT_MIN_GAPS, UsageLearner
from proxy.engine.policy import RECENCY_FLOOR_S, Candidate, cost_aware_cost

from .test_waits import run, use

GB = 1_000_000_000
GAP_S = 40.0


def learner_with_gaps(gaps: int, gap_s: float = GAP_S) -> UsageLearner:
    learner = UsageLearner()
    for i in range(gaps + 1):
        learner.observe("steady", i * gap_s, i * gap_s)
    return learner


def test_the_own_wait_is_the_mean_wait_left_by_gaps_longer_than_the_idle_time():
    learner = learner_with_gaps(12)
    last_s = 12 * GAP_S
    # idle 30 s into 40 s gaps: about 10 s ahead (each bin counted at its middle)
    assert learner.own_wait("steady", last_s + 30.0) == pytest.approx(10.0, abs=2.5)
    assert learner.own_wait("steady", last_s + 5.0) == pytest.approx(35.0, abs=5.0)
    assert learner.own_wait("unknown", last_s) is None


def test_the_own_wait_needs_enough_gaps_longer_than_the_idle_time():
    needed = math.ceil(OWN_WAIT_MIN_GAPS)
    assert learner_with_gaps(needed - 1).own_wait("steady", (needed - 1) * GAP_S + 30.0) is None
    assert learner_with_gaps(needed).own_wait("steady", needed * GAP_S + 30.0) is not None
    # past the longest gap seen, its own gaps say nothing
    assert learner_with_gaps(12).own_wait("steady", 12 * GAP_S + 2 * GAP_S) is None


def test_a_shorter_own_wait_raises_the_cost_a_longer_one_does_not():
    now = 1_000.0
    base = Candidate(key="m", footprint_bytes=4 * GB, last_used_s=now - 30.0, reload_s=3.0)
    soon = Candidate(key="m", footprint_bytes=4 * GB, last_used_s=now - 30.0, reload_s=3.0,
                     own_wait_s=10.0)
    late = Candidate(key="m", footprint_bytes=4 * GB, last_used_s=now - 30.0, reload_s=3.0,
                     own_wait_s=300.0)
    assert cost_aware_cost(soon, now) == pytest.approx(3.0 / 10.0)
    assert cost_aware_cost(late, now) == cost_aware_cost(base, now) == pytest.approx(3.0 / 30.0)
    # never below a second: a wait already overdue is not an infinite rate
    overdue = Candidate(key="m", footprint_bytes=4 * GB, last_used_s=now - 30.0, reload_s=3.0,
                        own_wait_s=0.0)
    assert cost_aware_cost(overdue, now) == pytest.approx(3.0)
    assert RECENCY_FLOOR_S < 30.0


async def steady_other_new(mgr, loop):
    """`steady` every GAP_S (12 gaps), `other` once 15 s after, `new` 30 s after: what stays."""
    for i in range(13):
        await asyncio.sleep(i * GAP_S - loop.time())
        await use(mgr, loop, "steady", 0.0)
    last_s = 12 * GAP_S
    await asyncio.sleep(last_s + 15.0 - loop.time())
    await use(mgr, loop, "other", 0.0)
    await asyncio.sleep(last_s + 30.0 - loop.time())
    await use(mgr, loop, "new", 0.0)
    return mgr.core.registry.loaded()


@pytest.mark.timeout(10)
def test_a_model_used_every_40_s_is_kept_over_one_used_once_more_recently():
    """Memory for two: `steady` asked for every 40 s (12 gaps), then `other` once, 15 s before
    a request for `new` needs one of them gone. By idle time `steady` (30 s) goes before
    `other` (15 s); by its own gaps `steady` is due in about 10 s, so `other` goes."""
    assert run({"steady": (4, 3.0), "other": (4, 3.0), "new": (4, 3.0)}, 8, steady_other_new,
               hold="off", prediction="off") == ["new", "steady"]


@pytest.mark.timeout(10)
def test_a_together_group_is_as_soon_due_as_its_soonest_member():
    """The same, with `steady` in a together group with `partner` (loaded beside it, never
    asked for): the group, 8 GB, is cheaper per GB than `other` by idle time, but `steady`'s
    own gaps make the group due in about 10 s."""
    pair = GroupConfig(name="pair", members=("steady", "partner"), policy="together")
    models = {"steady": (4, 3.0), "partner": (4, 3.0), "other": (4, 3.0), "new": (4, 3.0)}
    assert run(models, 12, steady_other_new, hold="off", prediction="off", groups=[pair]) == \
        ["new", "partner", "steady"]
