"""Requests heard after later ones (another replica's, told in its next batch): the learner puts
each in its place, as if it had come in order (engine/learning.py, engine/learner.py)."""
from __future__ import annotations

import random

import pytest

from proxy.engine.gaps import GapHistogram
from proxy.engine.learner import MAX_FOLLOWERS, RECENT_MAX, UsageLearner
from proxy.engine.learning import SHORT_GAP_S, ModelPattern
from proxy.engine.timers import minute_of_hour

pytestmark = pytest.mark.timeout(30)
WALL0_S = 1_700_000_000.0


def _times(seed: int, n: int) -> list[float]:
    """Arrival times on a 1/8 s grid (their differences exact): bursts, lulls and a clock."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.choice([rng.randint(1, 80) / 8, rng.randint(60 * 8, 3600 * 8) / 8, 300.0])
        out.append(t)
    return out


def _state(p: ModelPattern, now_s: float) -> tuple:
    return (p.gaps.counts, p.gaps.total, p.after_short.counts, p.after_short.total,
            p.after_long.counts, p.after_long.total, p.hours, p.requests,
            p.first_wall_s, p.last_at_s, p.last_gap_s, p.gap_after_short, list(p.starts),
            p.minute_starts, p.minutes_since_wall_s, p.period(now_s), p.clock(WALL0_S + now_s))


@pytest.mark.parametrize("seed", range(6))
def test_a_request_heard_within_the_latest_gap_leaves_the_pattern_as_if_in_order(seed):
    times = _times(seed, 300)
    in_order, late = ModelPattern(), ModelPattern()
    for t in times:
        _observe(in_order, t)
    rng = random.Random(seed + 100)
    i = 0
    while i < len(times):
        if i + 1 < len(times) and rng.random() < 0.4:     # the next one is heard first
            _observe(late, times[i + 1])
            _observe(late, times[i])
            i += 2
        else:
            _observe(late, times[i])
            i += 1
    assert late.gap_after_short is not None
    assert _state(late, times[-1]) == _state(in_order, times[-1])


def _observe(p: ModelPattern, t: float) -> None:
    """A request, then what the preloader's tick reads (cached until the starts change)."""
    p.observe(t, WALL0_S + t)
    p.period(t)
    p.clock(WALL0_S + t)


def test_the_first_request_heard_after_the_second_is_the_first_start():
    late = ModelPattern()
    late.observe(100.0, WALL0_S + 100)
    late.observe(30.0, WALL0_S + 30)
    in_order = ModelPattern()
    in_order.observe(30.0, WALL0_S + 30)
    in_order.observe(100.0, WALL0_S + 100)
    assert _state(late, 100.0) == _state(in_order, 100.0)
    assert list(late.starts) == [30.0, 100.0]          # 70 s apart: both after a lull


def test_a_request_heard_after_the_latest_gap_counts_but_moves_no_gap():
    p = ModelPattern()
    for t in (0.0, 10.0, 20.0):
        p.observe(t, WALL0_S + t)
    gaps = list(p.gaps.counts)
    p.observe(5.0, WALL0_S + 5)                       # before the latest gap (10 → 20)
    assert p.gaps.counts == gaps and p.last_gap_s == 10.0 and p.last_at_s == 20.0
    assert p.requests == 4 and sum(p.hours) == 4


def test_a_late_request_that_splits_a_lull_moves_its_start():
    p = ModelPattern()
    p.observe(0.0, WALL0_S)
    p.observe(100.0, WALL0_S + 100)                   # a start: 100 s after the last
    assert list(p.starts) == [0.0, 100.0]
    p.observe(70.0, WALL0_S + 70)                     # heard late: the lull ended at 70
    assert list(p.starts) == [0.0, 70.0]
    assert sum(p.minute_starts) == 2
    assert p.last_gap_s == 30.0 and p.gap_after_short is False


def test_a_request_heard_late_a_lull_after_the_one_before_it_is_a_start():
    late, in_order = ModelPattern(), ModelPattern()
    for t in (0.0, 120.0, 60.0):                      # 60 s after 0: exactly a lull
        _observe(late, t)
    for t in (0.0, 60.0, 120.0):
        _observe(in_order, t)
    assert list(late.starts) == [0.0, 60.0, 120.0]
    assert _state(late, 120.0) == _state(in_order, 120.0)


def test_a_gap_taken_back_from_an_empty_bin_takes_nothing():
    h = GapHistogram()                                 # (a halving may have emptied it)
    h.add(1.0)
    h.remove(5.0)
    assert h.total == 1 and sum(h.counts) == 1
    h.remove(1.0)
    assert h.total == 0 and sum(h.counts) == 0


def test_the_class_of_the_latest_gap_survives_a_restart():
    p = ModelPattern()
    for t in (0.0, 100.0, 110.0):
        p.observe(t, WALL0_S + t)
    restored = ModelPattern.restore(p.snapshot(110.0, WALL0_S + 110), 110.0, WALL0_S + 110)
    assert restored.gap_after_short is False
    restored.observe(105.0, WALL0_S + 105)             # splits 100 → 110, a gap after a lull
    p.observe(105.0, WALL0_S + 105)
    assert _state(restored, 110.0)[:9] == _state(p, 110.0)[:9]


def _learn(events: list[tuple[str, float]]) -> UsageLearner:
    learner = UsageLearner()
    for key, t in events:
        learner.observe(key, t, WALL0_S + t)
    return learner


def _followers(learner: UsageLearner) -> dict[str, dict[str, int]]:
    return {k: dict(p.followers) for k, p in learner.patterns.items()}


def test_a_request_heard_late_follows_the_earlier_ones_and_is_followed_by_the_later():
    in_order = _learn([("planner", 0.0), ("coder", 5.0), ("embedder", 9.0)])
    late = _learn([("planner", 0.0), ("embedder", 9.0), ("coder", 5.0)])
    assert _followers(late) == _followers(in_order) == {
        "planner": {"coder": 1, "embedder": 1}, "coder": {"embedder": 1}, "embedder": {}}
    assert [key for _, key, _ in late._recent] == ["planner", "coder", "embedder"]
    first_heard_last = _learn([("coder", 5.0), ("embedder", 9.0), ("planner", 0.0)])
    assert _followers(first_heard_last) == _followers(in_order)


def test_a_request_heard_late_is_followed_only_within_the_window():
    learner = _learn([("coder", 70.0), ("planner", 0.0)])
    assert learner.patterns["planner"].followers == {}


def test_a_request_older_than_every_kept_one_is_counted_but_not_kept():
    events = [(f"m{i}", 10.0 + i) for i in range(RECENT_MAX)]
    learner = _learn(events + [("old", 5.0)])
    assert learner.patterns["old"].followers == {f"m{i}": 1 for i in range(RECENT_MAX)}
    assert [key for _, key, _ in learner._recent] == [key for key, _ in events]
    learner.observe("next", 20.0, WALL0_S + 20)
    assert "next" in learner.patterns["m0"].followers
    assert "next" not in learner.patterns["old"].followers


def test_a_later_request_for_the_same_model_does_not_follow_the_late_one():
    learner = _learn([("planner", 10.0), ("planner", 0.0)])
    assert learner.patterns["planner"].followers == {}
    assert SHORT_GAP_S > 10.0 and learner.patterns["planner"].last_gap_s == 10.0


def test_a_late_request_is_followed_once_by_each_model_after_it():
    learner = _learn([("coder", 5.0), ("coder", 7.0), ("planner", 0.0)])
    assert learner.patterns["planner"].followers == {"coder": 1}


def test_a_late_request_takes_its_place_among_the_latest_when_they_are_full():
    events = [(f"m{i}", 10.0 + i) for i in range(RECENT_MAX)]
    learner = _learn(events + [("late", 11.5)])
    assert [key for _, key, _ in learner._recent] == ["m1", "late", "m2", "m3"]
    assert learner.patterns["late"].followers == {"m2": 1, "m3": 1}


def test_a_late_request_adds_no_follower_past_the_bound():
    learner = _learn([("s", 0.0), ("x", 20.0)])
    learner.patterns["s"].followers = {f"f{i}": 1 for i in range(MAX_FOLLOWERS)}
    learner.observe("new", 10.0, WALL0_S + 10)
    assert "new" not in learner.patterns["s"].followers
    assert learner.patterns["new"].followers == {"x": 1}


def test_a_timers_start_heard_late_counts_in_its_period():
    late, in_order = ModelPattern(), ModelPattern()
    for t in [300.0 * i for i in range(8)] + [2700.0, 2400.0]:
        _observe(late, t)
    for t in [300.0 * i for i in range(10)]:
        _observe(in_order, t)
    assert late.period(2700.0) == in_order.period(2700.0)
    assert late.period(2700.0).confidence == 1.0


def test_a_clocks_start_taken_back_by_a_late_request_leaves_its_minute():
    # At one minute of the hour three times, six hours on 90 s before it and at it again: a
    # start each; 21,555 s, heard last, turns the last one into a burst's second request.
    times = [0.0, 3600.0, 7200.0, 21_510.0, 21_555.0, 21_600.0]
    late, in_order = ModelPattern(), ModelPattern()
    for t in times[:4] + [times[5], times[4]]:
        _observe(late, t)
    for t in times:
        _observe(in_order, t)
    assert late.minute_starts[minute_of_hour(WALL0_S)] == 3
    assert late.clock(WALL0_S + 21_600).chance == 0.5
    assert _state(late, 21_600.0) == _state(in_order, 21_600.0)
