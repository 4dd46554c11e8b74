"""The StateStore contract: the same assertions over MemoryState and RedisState (a real
redis-server). Replicas are separate handles on one state: views of one MemoryState, separate
RedisState clients of one server."""
from __future__ import annotations

import asyncio

import pytest

from proxy.engine.clock import ManualClock
from proxy.state import HostRecord, LoadLock, MemoryState, Reserved, Whereabouts

from .redis_server import make_redis_server, redis_server  # noqa: F401
from .state_contract import EVENTS_MAXLEN, TTL_S, Fleet, until

GB = 1024 ** 3
LONG_S = 60.0


@pytest.fixture(params=["memory", "redis"])
async def fleet(request: pytest.FixtureRequest):
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    f = Fleet(request.param, url)
    yield f
    await f.close()


async def test_of_fifty_racing_acquirers_exactly_one_holds_the_lock(fleet):
    replicas = [fleet.replica(f"r{i}") for i in range(5)]
    got = await asyncio.gather(*(r.acquire_lock("h1", "m", LONG_S)
                                 for r in replicas for _ in range(10)))
    held = [lock for lock in got if lock is not None]
    assert len(held) == 1
    assert await held[0].valid()


async def test_the_lock_holder_is_named_while_it_holds_it(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    assert await b.lock_holder("h", "m") is None
    lock = await a.acquire_lock("h", "m", 5.0)
    assert await b.lock_holder("h", "m") == a.replica_id
    await lock.release()
    assert await b.lock_holder("h", "m") is None


async def test_locks_of_other_models_and_hosts_are_independent(fleet):
    a = fleet.replica("a")
    assert await a.acquire_lock("h1", "m", LONG_S) is not None
    assert await a.acquire_lock("h1", "m2", LONG_S) is not None
    assert await a.acquire_lock("h2", "m", LONG_S) is not None
    assert await a.acquire_lock("h1", "m", LONG_S) is None


async def test_only_the_holder_renews_or_releases(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    lock = await a.acquire_lock("h1", "m", LONG_S)
    forged = LoadLock(b, "h1", "m", lock.token)      # b knows the token, is not the holder
    assert not await forged.renew(LONG_S) and not await forged.release()
    assert await lock.valid()
    assert await lock.renew(LONG_S) and await lock.release()
    assert not await lock.valid() and not await lock.release()
    assert await b.acquire_lock("h1", "m", LONG_S) is not None


async def test_fencing_tokens_increase_and_a_stale_one_is_rejected(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    old = await a.acquire_lock("h1", "m", TTL_S)
    assert await old.valid()
    new = None

    async def b_takes_over() -> bool:
        nonlocal new
        new = await b.acquire_lock("h1", "m", LONG_S)
        return new is not None
    await until(b_takes_over)
    assert new.token > old.token
    assert not await old.valid() and await new.valid()
    assert not await a.check_fence("h1", "m", old.token)
    assert not await old.renew(LONG_S) and not await old.release()
    # A load's result is written only under its fence: the stale load's is refused.
    assert not await a.add_owned("h1", "inst-old", "m", fence=old.token)
    assert await b.add_owned("h1", "inst-new", "m", fence=new.token)
    assert await a.owned("h1") == {"inst-new": "m"}


async def test_a_renewed_lock_is_kept_and_an_abandoned_one_passes_on(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    lock = await a.acquire_lock("h1", "m", TTL_S)
    for _ in range(3):                # renewing outlasts several TTLs
        await asyncio.sleep(TTL_S / 4)
        assert await lock.renew(TTL_S)
        assert await b.acquire_lock("h1", "m", TTL_S) is None
    took_s = await until(lambda: _acquired(b, "h1", "m"))   # a stopped renewing: it died
    assert took_s < TTL_S + 1.0
    assert not await lock.valid()


async def _acquired(store, host: str, model: str) -> bool:
    return await store.acquire_lock(host, model, LONG_S) is not None


async def test_racing_reservations_never_exceed_the_budget(fleet):
    replicas = [fleet.replica(f"r{i}") for i in range(5)]
    for r in replicas:
        await r.heartbeat(LONG_S)
    budget = 10 * GB + GB // 2
    results = await asyncio.gather(*(r.reserve("h1", f"load-{i}", GB, budget, LONG_S)
                                     for r in replicas for i in range(10)))
    assert sum(res.granted for res in results) == 10
    assert all(res.reserved_bytes <= budget for res in results)
    assert await replicas[0].reserved_bytes("h1") == 10 * GB


async def test_a_refusal_says_what_is_reserved_and_a_release_frees_it(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    await a.heartbeat(LONG_S)
    await b.heartbeat(LONG_S)
    assert (await a.reserve("h1", "x", 6 * GB, 10 * GB, LONG_S)).granted
    again = await a.reserve("h1", "x", 7 * GB, 10 * GB, LONG_S)     # replaces its own
    assert again.granted and again.reserved_bytes == 7 * GB
    refused = await b.reserve("h1", "y", 4 * GB, 10 * GB, LONG_S)
    assert not refused.granted and refused.reserved_bytes == 7 * GB
    await a.release_reservation("h1", "x")
    assert (await b.reserve("h1", "y", 4 * GB, 10 * GB, LONG_S)).granted
    assert await a.reserved_bytes("h1") == 4 * GB
    assert await a.reserved_bytes("h2") == 0


async def test_a_replica_the_state_lost_is_refused_a_reservation_asked_if_live(fleet):
    # Redis restarted empty: until this replica's heartbeat is back it cannot know whose
    # loads under way have yet to put their reservations back.
    a, b = fleet.replica("a"), fleet.replica("b")
    await b.heartbeat(LONG_S)
    assert await a.reserve("h1", "x", GB, 10 * GB, LONG_S, if_live=True) == \
        Reserved(False, 0, lost=True)
    assert await b.reserved_bytes("h1") == 0
    await a.heartbeat(LONG_S)
    assert (await a.reserve("h1", "x", GB, 10 * GB, LONG_S, if_live=True)).granted
    refused = await b.reserve("h1", "y", 10 * GB, 10 * GB, LONG_S, if_live=True)
    assert not refused.granted and not refused.lost and refused.reserved_bytes == GB


async def test_reservations_and_leases_lapse_with_their_replicas_heartbeat(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    await a.heartbeat(TTL_S)
    await b.heartbeat(LONG_S)
    assert (await a.reserve("h1", "x", 8 * GB, 10 * GB, LONG_S)).granted
    await a.renew_leases([("h1", "m"), ("h2", "m")], LONG_S)
    assert await b.leased_by("h1", "m") == {"a"} and await b.reserved_bytes("h1") == 8 * GB
    # a stops beating: its long-lived lease and reservation stop counting with it.
    await until(lambda: _void(b, "h1", "m"))
    assert await b.leased_by("h2", "m") == set()
    assert await b.claim_unload("h2", "m", LONG_S) == set()     # nor does it hold off a claim
    assert (await b.reserve("h1", "y", 8 * GB, 10 * GB, LONG_S)).granted


async def _void(store, host: str, model: str) -> bool:
    return not await store.leased_by(host, model) and await store.reserved_bytes(host) == 0


async def test_reservations_and_leases_expire_on_their_own_ttl(fleet):
    a = fleet.replica("a")
    await a.heartbeat(LONG_S)
    await a.reserve("h1", "x", GB, 10 * GB, TTL_S)
    await a.renew_leases([("h1", "m")], TTL_S)
    assert await a.leased_by("h1", "m") == {"a"}
    await until(lambda: _void(a, "h1", "m"))


async def test_leases_are_per_replica_renewed_in_batch_and_dropped(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    await a.heartbeat(LONG_S)
    await b.heartbeat(LONG_S)
    await a.renew_leases([("h1", "m1"), ("h1", "m2")], LONG_S)
    await b.renew_leases([("h1", "m1")], LONG_S)
    assert await a.leased_by("h1", "m1") == {"a", "b"}
    await a.drop_leases([("h1", "m1"), ("h1", "m2")])
    assert await b.leased_by("h1", "m1") == {"b"}
    assert await b.leased_by("h1", "m2") == set()


async def test_idle_leases_give_way_to_another_replicas_want_until_its_claim(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    await a.heartbeat(LONG_S)
    await b.heartbeat(LONG_S)
    busy, idle, other = ("h1", "busy"), ("h1", "idle"), ("h1", "other")
    await a.renew_leases([busy, idle, other], LONG_S)
    assert await b.claim_unload("h1", "other", LONG_S) == {"a"}     # a refusal wants nothing
    await b.want_unload("h1", ["busy", "idle"], LONG_S)
    renewal = await a.renew_leases([busy, idle, other], LONG_S, idle=[idle, other])
    assert renewal.given_up == {idle: "b"} and renewal.wanted == {busy}
    assert await b.leased_by("h1", "idle") == set() and await b.leased_by("h1", "busy") == {"a"}
    assert await b.leased_by("h1", "other") == {"a"}
    assert await a.wanted_by("h1", "idle") == "b" and await a.wanted_by("h1", "other") is None
    # The claim that gets the model ends its want: a lease taken again stays.
    assert await b.claim_unload("h1", "idle", LONG_S) == set()
    assert await a.wanted_by("h1", "idle") is None
    await b.release_unload("h1", "idle")
    assert (await a.renew_leases([idle], LONG_S, idle=[idle])).given_up == {}
    assert await b.leased_by("h1", "idle") == {"a"}
    # The wanting replica's own idle lease stays: the want is for others to give way to.
    await b.renew_leases([busy], LONG_S)
    assert (await b.renew_leases([busy], LONG_S, idle=[busy])).given_up == {}


async def test_the_claim_that_unloads_a_model_ends_what_its_loads_hold_reserved(fleet):
    # A loaded model's reservation outlives its load a moment, for replicas that have not
    # seen it resident yet; once a replica claims it for its unload that memory is coming
    # free, and a load waiting for it must not wait for the reservation to lapse too.
    a, b = fleet.replica("a"), fleet.replica("b")
    await a.heartbeat(LONG_S)
    await b.heartbeat(LONG_S)
    assert (await a.reserve("h1", "m", 8 * GB, 10 * GB, LONG_S)).granted
    assert (await a.reserve("h1", "kept", 1 * GB, 10 * GB, LONG_S)).granted
    assert (await a.reserve("h2", "m", 1 * GB, 10 * GB, LONG_S)).granted
    assert await b.claim_unload("h1", "m", LONG_S) == set()
    assert await b.reserved_bytes("h1") == 1 * GB          # another model's stays
    assert await b.reserved_bytes("h2") == 1 * GB          # so does another host's
    assert (await b.reserve("h1", "n", 8 * GB, 10 * GB, LONG_S)).granted


async def test_a_want_lapses_with_its_ttl(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    await a.heartbeat(LONG_S)
    await b.heartbeat(LONG_S)
    await a.renew_leases([("h1", "m")], LONG_S)
    await b.want_unload("h1", ["m"], TTL_S)

    async def lapsed() -> bool:
        renewal = await a.renew_leases([("h1", "m")], LONG_S)
        return renewal.wanted == set()
    await until(lapsed)
    assert (await a.renew_leases([("h1", "m")], LONG_S, idle=[("h1", "m")])).given_up == {}


async def test_a_withdrawn_want_gives_no_lease_up_and_leaves_anothers_want(fleet):
    a, b, c = fleet.replica("a"), fleet.replica("b"), fleet.replica("c")
    for r in (a, b, c):
        await r.heartbeat(LONG_S)
    m, n = ("h1", "m"), ("h1", "n")
    await a.renew_leases([m, n], LONG_S)
    await b.want_unload("h1", ["m", "n"], LONG_S)
    await b.withdraw_wants("h1", ["m"])           # its load no longer waits for m
    assert await a.wanted_by("h1", "m") is None and await a.wanted_by("h1", "n") == "b"
    renewal = await a.renew_leases([m, n], LONG_S, idle=[m])
    assert renewal.given_up == {} and renewal.wanted == {n}
    assert await c.leased_by("h1", "m") == {"a"}
    # Only its own: c wants n now, and b's withdrawal leaves c's want standing.
    await c.want_unload("h1", ["n"], LONG_S)
    await b.withdraw_wants("h1", ["n"])
    assert await a.wanted_by("h1", "n") == "c"
    await b.withdraw_wants("h1", [])              # nothing to withdraw: no call fails
    # A replica that left wants nothing: its want gives no lease up.
    await c.retire()
    assert await a.wanted_by("h1", "n") is None
    assert (await a.renew_leases([n], LONG_S, idle=[n])).given_up == {}


async def test_loads_waiting_for_room_are_seen_per_host_until_ended_or_lapsed(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    await a.heartbeat(LONG_S)
    await b.heartbeat(LONG_S)
    await a.note_waiting("h1", "m", LONG_S)
    await a.note_waiting("h1", "short", TTL_S)
    await b.note_waiting("h1", "n", LONG_S)
    assert await b.waiting_loads("h1") == {("a", "m"), ("a", "short"), ("b", "n")}
    assert await b.waiting_loads("h2") == set()
    await a.end_waiting("h1", "m")
    await a.end_waiting("h1", "n")                # another replica's is left alone
    assert await b.waiting_loads("h1") == {("a", "short"), ("b", "n")}

    async def lapsed() -> bool:
        return await b.waiting_loads("h1") == {("b", "n")}
    await until(lapsed)
    await b.retire()                              # they void with their replica
    assert await a.waiting_loads("h1") == set()


async def test_a_retired_replica_voids_its_leases_at_once(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    await a.heartbeat(LONG_S)
    await b.heartbeat(LONG_S)
    await a.renew_leases([("h1", "m")], LONG_S)
    assert await b.replicas() == ["a", "b"]
    await a.retire()
    assert await b.replicas() == ["b"] and await b.leased_by("h1", "m") == set()


async def test_the_leader_fails_over_within_its_ttl(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    assert await a.campaign(TTL_S) and await a.is_leader()
    for _ in range(3):
        await asyncio.sleep(TTL_S / 4)
        assert await a.campaign(TTL_S)          # renewing keeps it
        assert not await b.campaign(TTL_S) and await b.leader() == "a"
    took_s = await until(lambda: b.campaign(TTL_S))     # a stopped renewing
    assert took_s < TTL_S + 1.0
    assert await b.is_leader() and not await a.is_leader() and await a.leader() == "b"
    await a.resign()                            # not the leader: changes nothing
    assert await b.is_leader()
    await b.resign()
    assert await b.leader() is None and await a.campaign(TTL_S)


async def test_events_resume_by_id_and_show_on_another_replica(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    ids = [await a.append_event("state", {"model": f"m{i}"}) for i in range(3)]
    seen = await b.events_after(None)
    assert [e.id for e in seen] == ids and seen[0].type == "state"
    assert seen[2].data == {"model": "m2"}
    assert [e.data["model"] for e in await b.events_after(ids[0])] == ["m1", "m2"]
    assert await b.events_after(ids[2]) == []
    assert [e.id for e in await b.events_after(None, count=2)] == ids[:2]


async def test_a_waiting_reader_gets_the_next_event(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    last = await a.append_event("state", {"n": 0})
    waiting = asyncio.create_task(b.events_after(last, wait_s=0.9))
    await asyncio.sleep(0.05)
    assert not waiting.done()                   # it is waiting, not returned empty
    await a.append_event("load", {"n": 1})
    got = await waiting
    assert [(e.type, e.data) for e in got] == [("load", {"n": 1})]


async def test_a_waiting_reader_cancelled_as_an_event_arrives_stops(fleet):
    # A replica's relay is closed by cancelling its reader; one that went on reading instead
    # held up the replica's shutdown for good.
    a, b = fleet.replica("a"), fleet.replica("b")
    last = await a.append_event("state", {"n": 0})
    waiting = asyncio.create_task(b.events_after(last, wait_s=5))
    await asyncio.sleep(0.05)
    await a.append_event("load", {"n": 1})
    if waiting.cancel():       # still running (on Redis the reply may have come first)
        with pytest.raises(asyncio.CancelledError):
            await waiting


async def test_events_are_trimmed_to_their_maximum_length(fleet):
    a = fleet.replica("a")
    ids = [await a.append_event("tick", {"n": i}) for i in range(EVENTS_MAXLEN + 10)]
    kept = await a.events_after(None, count=1000)
    assert [e.id for e in kept] == ids[10:]


async def test_a_bad_event_id_is_a_clear_error(fleet):
    with pytest.raises(ValueError, match="not an event id"):
        await fleet.replica("a").events_after("yesterday")


async def test_host_records_are_shared_and_expire(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    record = HostRecord(resident={"inst-1": "m"}, used_bytes=3 * GB, budget_bytes=64 * GB,
                        reported_by="a", url="http://gpu-box:1234")
    await a.put_host("h1", record, TTL_S)
    await a.put_host("h2", HostRecord(reported_by="a"), LONG_S)
    assert await b.get_host("h1") == record
    assert set(await b.hosts()) == {"h1", "h2"}
    await until(lambda: _gone(b, "h1"))
    assert list(await b.hosts()) == ["h2"]


async def _gone(store, host: str) -> bool:
    return await store.get_host(host) is None


async def test_ownership_survives_a_replica_restart(fleet):
    a = fleet.replica("a")
    assert await a.add_owned("h1", "inst-1", "m1") and await a.add_owned("h1", "inst-2", "m2")
    await a.remove_owned("h1", "inst-2")
    restarted = fleet.replica("a-restarted")
    assert await restarted.owned("h1") == {"inst-1": "m1"}
    assert await restarted.owned("h2") == {}


async def test_memory_state_expires_on_its_injected_clock():
    clock = ManualClock()
    a = MemoryState("a", clock=clock)
    b = a.view("b")
    lock = await a.acquire_lock("h1", "m", 10.0)
    await a.heartbeat(10.0)
    await a.renew_leases([("h1", "m")], 30.0)
    assert await a.campaign(10.0)
    clock.advance(9.9)
    assert await lock.valid() and await b.leased_by("h1", "m") == {"a"}
    assert not await b.campaign(10.0)
    clock.advance(0.2)
    assert not await lock.valid() and await b.leased_by("h1", "m") == set()
    assert await b.campaign(10.0) and await b.acquire_lock("h1", "m", 10.0) is not None


async def test_an_unload_claim_and_a_new_lease_never_both_go_ahead(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    await a.heartbeat(LONG_S)
    await b.heartbeat(LONG_S)
    await a.renew_leases([("h1", "m")], LONG_S)
    assert await b.claim_unload("h1", "m", LONG_S) == {"a"}     # a serves it: no claim
    assert await b.take_lease("h1", "m", LONG_S)                # so b may serve it too
    assert await a.take_lease("h1", "m", LONG_S)                # and a goes on serving it
    await a.drop_leases([("h1", "m")])
    assert await b.claim_unload("h1", "m", LONG_S) == set()     # its own lease does not count
    await b.release_unload("h1", "m")
    await b.drop_leases([("h1", "m")])
    assert await a.claim_unload("h1", "m", LONG_S) == set()     # nobody serves it: a's claim
    assert await a.claim_unload("h1", "m", LONG_S) == set()     # claimed again: still a's
    assert not await b.take_lease("h1", "m", LONG_S)            # b must not serve it now
    assert await b.leased_by("h1", "m") == set()
    assert await a.take_lease("h1", "m", LONG_S)                # the claimant's own is not held
    assert await b.take_lease("h1", "m2", LONG_S)               # other models are unaffected
    await b.release_unload("h1", "m")                           # not b's: changes nothing
    assert not await b.take_lease("h1", "m", LONG_S)
    await a.release_unload("h1", "m")
    assert await b.take_lease("h1", "m", LONG_S)
    assert await b.leased_by("h1", "m") == {"a", "b"}


async def test_racing_unload_claims_and_leases_give_one_or_the_other(fleet):
    for round_n in range(10):
        a, b = fleet.replica(f"a{round_n}"), fleet.replica(f"b{round_n}")
        await a.heartbeat(LONG_S)
        await b.heartbeat(LONG_S)
        claimed, leased = await asyncio.gather(a.claim_unload("h", f"m{round_n}", LONG_S),
                                               b.take_lease("h", f"m{round_n}", LONG_S))
        assert (claimed == set()) != leased, (claimed, leased)


async def test_an_abandoned_unload_claim_lapses_on_its_ttl(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    assert await a.claim_unload("h1", "m", TTL_S) == set()
    assert not await b.take_lease("h1", "m", LONG_S)
    await until(lambda: b.take_lease("h1", "m", LONG_S))


async def test_a_reader_starting_at_the_last_event_id_sees_only_what_follows(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    assert await b.last_event_id() == "0-0"
    assert await b.events_after(await b.last_event_id()) == []
    await a.append_event("state", {"n": 1})
    last = await a.append_event("state", {"n": 2})
    assert await b.last_event_id() == last
    start = await b.last_event_id()
    await a.append_event("load", {"n": 3})
    assert [e.data for e in await b.events_after(start)] == [{"n": 3}]


async def test_learned_measurements_are_shared_stamped_and_merged_by_kind(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    assert await b.learned("h1") == {}
    at_a = await a.put_learned("h1", "org/m|q4", footprint_bytes=5.5 * GB, load_s=12.25,
                               ttl_s=LONG_S)
    got = (await b.learned("h1"))["org/m|q4"]
    assert (got.footprint.value, got.footprint.at_ms, got.footprint.by) == (5.5 * GB, at_a, "a")
    assert (got.load.value, got.load.by) == (12.25, "a")
    await asyncio.sleep(0.01)                     # a later stamp, on the store's clock
    at_b = await b.put_learned("h1", "org/m|q4", load_s=9.0, ttl_s=LONG_S)
    assert at_b > at_a
    got = (await a.learned("h1"))["org/m|q4"]
    assert got.footprint.by == "a" and got.footprint.value == 5.5 * GB   # kept
    assert (got.load.value, got.load.at_ms, got.load.by) == (9.0, at_b, "b")
    assert await a.learned("h2") == {}


async def test_learned_measurements_expire_unless_written_again(fleet):
    a = fleet.replica("a")
    await a.put_learned("h1", "m", load_s=3.0, ttl_s=TTL_S)
    assert "m" in await a.learned("h1")
    await until(lambda: _unlearned(a, "h1"))
    # Written again after it lapsed: nothing of the lapsed record comes back with it.
    await a.put_learned("h1", "m", footprint_bytes=GB, ttl_s=LONG_S)
    assert (await a.learned("h1"))["m"].load is None


async def _unlearned(store, host: str) -> bool:
    return await store.learned(host) == {}


async def test_a_first_lease_on_the_fleets_copy_is_refused_once_a_replica_unloaded_it(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    await a.add_owned("h1", "inst", "m")
    assert await b.take_lease("h1", "m", LONG_S, ["inst"]) is True
    await a.remove_owned("h1", "inst")                          # a unloaded it
    assert await b.take_lease("h1", "m", LONG_S, ["inst"]) is None
    assert await b.take_lease("h1", "m", LONG_S) is True        # unasked: the host said so
    await a.claim_unload("h1", "m2", LONG_S)
    assert await b.take_lease("h1", "m2", LONG_S, ["x"]) is False   # going: the claim first


async def test_whereabouts_name_who_loads_a_model_and_where_the_fleets_copy_is(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    await a.acquire_lock("h1", "m", LONG_S)
    await b.add_owned("h2", "inst", "m")
    await b.add_owned("h3", "inst", "other")
    found = await b.whereabouts("m", ["h1", "h2", "h3"])
    assert found == {"h1": Whereabouts("a", False), "h2": Whereabouts(None, True),
                     "h3": Whereabouts(None, False)}
    assert await b.whereabouts("m", []) == {}


async def test_usage_patterns_are_kept_per_host_and_replaced_per_model(fleet):
    a, b = fleet.replica("a"), fleet.replica("b")
    assert await b.patterns("h1") == {}
    await a.put_patterns("h1", {"m": {"requests": 3, "followers": {"n": 2}},
                                "n": {"requests": 1}}, ttl_s=LONG_S)
    await b.put_patterns("h1", {"m": {"requests": 5}}, ttl_s=LONG_S)
    await a.put_patterns("h1", {}, ttl_s=LONG_S)
    assert await a.patterns("h1") == {"m": {"requests": 5}, "n": {"requests": 1}}
    assert await a.patterns("h2") == {}


async def test_usage_patterns_expire_unless_written_again(fleet):
    a = fleet.replica("a")
    await a.put_patterns("h1", {"m": {"requests": 3}}, ttl_s=TTL_S)
    await until(lambda: _no_patterns(a, "h1"))
    await a.put_patterns("h1", {"n": {"requests": 1}}, ttl_s=LONG_S)
    assert await a.patterns("h1") == {"n": {"requests": 1}}


async def _no_patterns(store, host: str) -> bool:
    return await store.patterns(host) == {}
