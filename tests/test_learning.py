"""The usage model recovers known patterns from synthetic histories; victim sets are chosen
as a whole."""
from __future__ import annotations

import math
import random

import pytest

from proxy.engine.learner import UsageLearner
from proxy.engine.learning import ModelPattern, hour_of_week
from proxy.engine.policy import Candidate, cheapest_cover, expected_cost_s, select_victims

GB = 1_000_000_000
MONDAY = 1_700_438_400.0          # 2023-11-20 00:00 UTC, a Monday


def pattern_from(gaps):
    p, t = ModelPattern(), 0.0
    p.observe(t, MONDAY)
    for g in gaps:
        t += g
        p.observe(t, MONDAY + t)
    return p


def test_an_exponential_gap_distribution_is_recovered():
    rng = random.Random(7)
    p = pattern_from(rng.expovariate(1 / 100.0) for _ in range(2000))
    for age in (1.0, 50.0, 150.0):                   # memoryless: the same at every age
        pred = p.predict(age, 100.0)
        assert pred.p_within == pytest.approx(1 - math.exp(-1), abs=0.06)
        assert pred.expected_wait_s == pytest.approx(100.0, rel=0.25)


def test_a_periodic_model_is_due_at_its_period():
    p = pattern_from([600.0] * 200)                  # every ten minutes, like a cron job
    assert p.predict(590.0, 120.0).p_within > 0.8    # due now
    assert p.predict(30.0, 60.0).p_within < 0.1      # just served: not due for a while
    assert p.predict(30.0, 60.0).expected_wait_s == pytest.approx(570.0, rel=0.3)


def test_with_no_evidence_the_wait_ahead_is_about_the_wait_so_far():
    p = pattern_from([5.0] * 50)                     # bursts only: nothing known past 5 s
    pred = p.predict(1000.0, 1000.0)
    assert pred.p_within == pytest.approx(0.5, abs=0.05)   # the prior: a / (a + h)


def test_the_class_of_the_previous_gap_refines_the_prediction():
    rng = random.Random(3)
    gaps = []
    for _ in range(300):                             # pairs of requests 2 s apart, hourly
        gaps += [2.0, 3600.0 + rng.uniform(-60, 60)]
    p = pattern_from(gaps)
    p.last_gap_s = 3600.0                            # first of a pair: the second comes soon
    assert p.predict(1.0, 5.0).p_within > 0.8
    p.last_gap_s = 2.0                               # second of a pair: an hour of quiet
    assert p.predict(1.0, 5.0).p_within < 0.2
    assert p.predict(1.0, 5.0).expected_wait_s > 1000


def test_sequences_are_learned():
    rng = random.Random(1)
    learner, t = UsageLearner(), 0.0
    for _ in range(200):                             # planner → coder → embedder, in seconds
        t += rng.uniform(300, 900)
        for model, dt in (("planner", 0.0), ("coder", 4.0), ("embedder", 9.0)):
            learner.observe(model, t + dt, MONDAY + t + dt)
        if rng.random() < 0.5:
            learner.observe("chat", t + 200, MONDAY + t + 200)
    assert learner.follow_probability("planner", "coder") == pytest.approx(1.0, abs=0.01)
    assert learner.follow_probability("coder", "embedder") == pytest.approx(1.0, abs=0.01)
    assert learner.follow_probability("planner", "chat") < 0.05    # 200 s: not a follower
    assert [k for k, _ in learner.likely_next("planner", 0.5)] == ["coder", "embedder"]


def test_rhythm_by_hour_of_week_is_learned():
    p, t0 = ModelPattern(), MONDAY
    for week in range(4):
        for minute in range(0, 60, 5):               # Mondays 09:00-10:00 only
            at = t0 + week * 7 * 86400 + 9 * 3600 + minute * 60
            p.observe(at, at)
    now = t0 + 4 * 7 * 86400
    assert p.rate_in_hour(now + 9 * 3600) == pytest.approx(12 * 4 / 4, rel=0.05)
    assert p.rate_in_hour(now + 15 * 3600) == 0
    assert hour_of_week(MONDAY) == 0 and hour_of_week(MONDAY + 86400 * 6 + 3600 * 23) == 167


def test_patterns_survive_a_snapshot():
    learner = UsageLearner()
    for i in range(30):
        learner.observe("a", i * 10.0, MONDAY + i * 10.0)
        learner.observe("b", i * 10.0 + 1, MONDAY + i * 10.0 + 1)
    again = ModelPattern.restore(learner.pattern("a").snapshot())
    assert again.gaps.counts == learner.pattern("a").gaps.counts
    assert again.followers == {"b": 30} and again.requests == 30


def test_a_snapshot_keeps_the_histories_and_the_idle_time_on_a_new_clock():
    """Saved 300 s after the last request; restored 100 s of wall time later on a monotonic
    clock that now reads 50: idle for 400 s."""
    p = pattern_from([30.0, 200.0] * 20)
    last = p.last_at_s
    again = ModelPattern.restore(p.snapshot(last + 300.0, MONDAY + last + 300.0),
                                 50.0, MONDAY + last + 400.0)
    for name in ("gaps", "after_short", "after_long"):
        assert getattr(again, name).counts == getattr(p, name).counts
    assert again.hours == p.hours and again.requests == p.requests == 41
    assert again.first_wall_s == MONDAY and again.last_gap_s == 200.0
    assert again.last_at_s == pytest.approx(50.0 - 400.0)
    assert again.predict(400.0, 60.0) == p.predict(400.0, 60.0)
    back = ModelPattern.restore(p.snapshot(last, MONDAY + last), 50.0, MONDAY + last - 600.0)
    assert back.last_at_s == 50.0              # a wall clock that went back: idle from now


def test_a_damaged_snapshot_restores_what_it_can():
    blank = ModelPattern()
    assert ModelPattern.restore(blank.snapshot()).last_at_s is None     # never asked for
    empty = ModelPattern.restore({})
    assert (empty.requests, empty.first_wall_s, empty.last_at_s, empty.last_gap_s) == \
        (0, None, None, None)
    damaged = ModelPattern.restore({"gaps": [1, 2, 3], "after_short": "x", "hours": [1] * 24,
                                    "first_wall_s": "monday", "last_wall_s": [1.0],
                                    "last_gap_s": "long", "requests": 7}, 50.0, MONDAY)
    assert damaged.gaps.counts == blank.gaps.counts and damaged.hours == blank.hours
    assert damaged.after_short.counts == blank.after_short.counts
    assert (damaged.requests, damaged.first_wall_s, damaged.last_at_s, damaged.last_gap_s) == \
        (7, None, None, None)


# -- victim sets ---------------------------------------------------------------------------------
def cand(key, gb, p_reuse, reload_s=None, priority=5):
    return Candidate(key=key, footprint_bytes=gb * GB, last_used_s=0.0, priority=priority,
                     reload_s=reload_s if reload_s is not None else gb / 1.5 + 1.5,
                     p_reuse=p_reuse)


def test_one_large_idle_model_goes_rather_than_three_small_hot_ones():
    small = [cand(f"small-{i}", 3, 0.9) for i in range(3)]
    large = cand("large", 10, 0.3)
    assert select_victims("predictive", small + [large], 9 * GB, 0.0) == ("large",)


def test_the_set_is_the_cheapest_cover_not_the_cheapest_per_gb():
    # Per GB, a is cheapest; but a alone does not cover, and a + c costs more than b.
    a, b, c = cand("a", 4, 0.1), cand("b", 8, 0.3), cand("c", 5, 0.6)
    chosen = cheapest_cover([a, b, c], 7 * GB, expected_cost_s)
    assert chosen == ("b",)
    assert expected_cost_s(b) < expected_cost_s(a) + expected_cost_s(c)


def test_among_equal_costs_the_cover_that_frees_least_is_chosen():
    cold = [cand("x", 9, 0.0), cand("y", 5, 0.0), cand("z", 6, 0.0)]
    assert cheapest_cover(cold, 5 * GB, expected_cost_s) == ("y",)
    assert cheapest_cover(cold, 30 * GB, expected_cost_s) == ()


def test_the_set_beats_cheapest_per_gb_first():
    # Cheapest per GB first takes c then a (1.09); the cheapest cover is a + b (1.0).
    def k(key, gb, cost):
        return Candidate(key=key, footprint_bytes=gb * GB, last_used_s=0.0, reload_s=1.0,
                         p_reuse=cost)
    pool = [k("a", 5, 0.5), k("b", 5, 0.5), k("c", 6, 0.59), k("d", 4, 0.42)]
    assert sorted(select_victims("predictive", pool, 10 * GB, 0.0)) == ["a", "b"]


async def test_learned_patterns_survive_a_restart(emulator, tmp_path):
    from .test_operation import managed
    from proxy.store import UsageStore
    path = tmp_path / "history.sqlite3"
    first = await managed(emulator.url, store=UsageStore(path))
    for _ in range(3):
        (await first.acquire("qwen/qwen3-4b")).release()
        (await first.acquire("google/gemma-3-12b")).release()
    await first.cleanup()
    second = await managed(emulator.url, store=UsageStore(path))
    pattern = second.core.learner.patterns["qwen/qwen3-4b"]
    assert pattern.requests == 3 and pattern.followers["google/gemma-3-12b"] == 3
    assert pattern.gaps.total == 2
    await second.cleanup()


# -- edges of the gap model ----------------------------------------------------------------------
def test_old_habits_fade():
    """8000 gaps of 10 s, then 3000 of ten minutes: the counts are halved as they grow, so the
    newer habit outweighs the older, longer one."""
    p = ModelPattern()
    for _ in range(8000):
        p.gaps.add(10.0)
    for _ in range(3000):
        p.gaps.add(600.0)
    assert p.gaps.total <= 4096
    assert p.gaps.survival(60.0) / p.gaps.total > 0.5            # most gaps now: ten minutes
    assert p.predict(1.0, 30.0).p_within < 0.5                   # not a burst any more


def test_a_model_asked_for_once_is_predicted_by_the_prior_alone():
    p = pattern_from([])                                         # one request, no gap yet
    pred = p.predict(100.0, 100.0)
    assert pred.p_within == pytest.approx(0.5, abs=0.01)         # a / (a + h)
    assert 100.0 < pred.expected_wait_s < 1e7                    # longer than so far; bounded


def test_a_model_idle_for_longer_than_the_longest_gap_kept_is_still_predicted():
    """Gaps of a month lie past the histogram's last bound (about nine days): they all count
    as longer than an idleness of three weeks."""
    month_s = 30 * 86400.0
    p = pattern_from([month_s] * 20)
    pred = p.predict(21 * 86400.0, 3600.0)
    assert 0.0 <= pred.p_within < 0.01
    assert pred.expected_wait_s > 86400.0
    bare = pattern_from([60.0] * 20)                             # nothing ever that long
    assert bare.predict(21 * 86400.0, 3600.0).p_within == pytest.approx(1 / (21 * 24 + 1))


def test_the_share_of_gaps_longer_than_x_falls_smoothly_from_all_to_none():
    """Interpolated within its bin: no step at a bin's bounds, none going up."""
    rng = random.Random(5)
    p = pattern_from(math.exp(rng.uniform(math.log(0.05), math.log(5e4))) for _ in range(3000))
    h = p.gaps
    assert h.survival(0.0) == pytest.approx(h.total) and h.survival(1e6) == 0.0
    xs = [0.01 * 1.01 ** i for i in range(1500)]           # 0.01 s … 30 days, 1 % apart
    values = [h.survival(x) for x in xs]
    assert all(b <= a + 1e-9 for a, b in zip(values, values[1:]))
    assert max(a - b for a, b in zip(values, values[1:])) < 0.01 * h.total


def test_a_gap_class_seen_rarely_falls_back_on_all_gaps():
    """Bursts 10 s apart, then two long gaps: after a long gap only one gap was ever seen,
    too few to go by; all gaps say the next request comes within seconds."""
    p = pattern_from([10.0] * 300 + [600.0, 600.0])
    pred = p.predict(1.0, 15.0)
    assert pred.p_within > 0.9 and pred.expected_wait_s < 30.0


def test_a_model_never_asked_for_is_not_expected():
    learner = UsageLearner()
    learner.patterns["restored"] = ModelPattern.restore({"requests": 3})   # no last request
    for key in ("unknown", "restored"):
        assert learner.predict(key, 1000.0, 60.0).p_within == 0.0

# -- followers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("after_s,follows", [(45.0, True), (90.0, False)])
def test_a_follower_comes_within_a_minute(after_s, follows):
    learner, t = UsageLearner(), 0.0
    for _ in range(10):
        learner.observe("a", t, MONDAY + t)
        learner.observe("b", t + after_s, MONDAY + t + after_s)
        t += 1000.0
    assert learner.follow_probability("a", "b") == (1.0 if follows else 0.0)


def test_a_request_follows_only_the_latest_four():
    learner, t = UsageLearner(), 0.0
    for _ in range(10):
        for i, key in enumerate("abcdef"):                 # one a second
            learner.observe(key, t + i, MONDAY + t + i)
        t += 1000.0
    assert learner.follow_probability("a", "e") == 1.0    # a, b, c, d before it
    assert learner.follow_probability("a", "f") == 0.0    # b, c, d, e before it
    assert learner.follow_probability("b", "f") == 1.0


def test_a_model_counts_its_first_32_followers_only():
    learner, t = UsageLearner(), 0.0
    for i in range(40):
        learner.observe("hub", t, MONDAY + t)
        learner.observe(f"f{i}", t + 1, MONDAY + t + 1)
        t += 1000.0
    learner.observe("hub", t, MONDAY + t)
    learner.observe("f0", t + 1, MONDAY + t + 1)
    followers = learner.pattern("hub").followers
    assert set(followers) == {f"f{i}" for i in range(32)} and followers["f0"] == 2


def test_a_follow_probability_is_the_share_of_requests_followed():
    learner, t = UsageLearner(), 0.0
    for i in range(10):
        learner.observe("a", t, MONDAY + t)
        if i < 7:
            learner.observe("b", t + 5, MONDAY + t + 5)
        t += 1000.0
    assert learner.follow_probability("a", "b") == pytest.approx(0.7)
    assert learner.likely_next("a", 0.7) == [("b", pytest.approx(0.7))]   # at least: kept
    assert learner.likely_next("a", 0.75) == []
    assert learner.follow_probability("b", "a") == 0.0               # the other way: never
    assert learner.follow_probability("never-asked-for", "a") == 0.0
    assert learner.likely_next("never-asked-for", 0.1) == []


def test_a_follow_chance_lasts_until_the_follower_comes_or_the_minute_is_over():
    learner, t = UsageLearner(), 0.0
    for _ in range(10):                                  # a, then b five seconds later
        learner.observe("a", t, MONDAY + t)
        learner.observe("b", t + 5, MONDAY + t + 5)
        t += 1000.0
    learner.observe("a", t, MONDAY + t)
    assert learner.follow_chance("b", t + 3) == pytest.approx(1.0, abs=0.1)
    assert learner.follow_chance("a", t + 3) == 0.0      # a is not its own next step
    assert learner.follow_chance("b", t + 90) == 0.0     # the minute is over
    learner.observe("b", t + 5, MONDAY + t + 5)
    assert learner.follow_chance("b", t + 6) == 0.0      # it came

# -- rhythms -------------------------------------------------------------------------------------
def test_a_weekly_rhythm_counts_after_one_week_of_history_not_before():
    p = ModelPattern()
    p.observe(0.0, MONDAY + 9 * 3600)                       # Monday 09:00
    p.observe(1.0, MONDAY + 6 * 86400 + 9 * 3600)           # Sunday 09:00
    assert p.rate_in_hour(MONDAY + 6 * 86400 + 9 * 3600 + 60) == 0.0     # six days: no rhythm
    assert p.rate_in_hour(MONDAY + 7 * 86400 + 9 * 3600 + 60) == pytest.approx(1.0, rel=0.01)


def test_a_pattern_without_a_first_request_has_no_rhythm():
    p = ModelPattern.restore({"requests": 3})
    assert p.rate_in_hour(MONDAY) == 0.0 and p.rate_at_hour_of_day(MONDAY, 300.0) == 0.0


def test_an_hour_of_day_rate_is_per_day_observed_after_one_day():
    daily, once = ModelPattern(), ModelPattern()
    for day in range(4):                                    # 09:01, four days; once on the first
        at = MONDAY + day * 86400 + 9 * 3600 + 60
        daily.observe(at, at)
        if day == 0:
            once.observe(at, at)
    now = MONDAY + 4 * 86400 + 8 * 3600 + 55 * 60           # 08:55, five minutes ahead: 09:00
    assert daily.rate_at_hour_of_day(now, 300.0) == pytest.approx(1.0, rel=0.1)
    assert once.rate_at_hour_of_day(now, 300.0) == pytest.approx(0.25, rel=0.1)
    assert daily.rate_at_hour_of_day(now, 0.0) == 0.0        # nothing at 08:00
    assert once.rate_at_hour_of_day(now - 3 * 86400, 300.0) == 0.0   # under a day after it
