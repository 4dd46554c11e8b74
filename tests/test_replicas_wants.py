"""A load on one replica waits for the memory of a model another replica serves: that replica
gives its lease up at the model's next idle moment there, as a single proxy would evict the
model between two requests (engine/shared_wants.py)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest

from proxy.engine.clock import ManualClock
from proxy.engine.core import EngineCore
from proxy.engine.replica import Replica
from proxy.errors import InsufficientMemory, StateUnavailable
from proxy.observe.relayed import EventRelay
from proxy.state import MemoryState, create_state

from .redis_server import make_redis_server, redis_server  # noqa: F401
from .state_contract import Hub, until
from .test_replicas_contention import MANAGED, GatedBackend, _close, _config

pytestmark = pytest.mark.timeout(30)
A, B, C = "lab/a", "lab/b", "lab/c"


async def _pair(backend: GatedBackend, lease_ttl_s: float, hearing: bool = True,
                clock: ManualClock | None = None, **eviction: Any
                ) -> tuple[EngineCore, EngineCore, list[EventRelay]]:
    """Two replicas' engines on one server, each hearing the other's events as in the app
    (`hearing`; else only what the shared state says); the second's on `clock` if given."""
    facts = MemoryState("r1")
    cores, relays = [], []
    for store, core_clock in ((facts, None), (facts.view("r2"), clock)):
        replica = Replica(store, lease_ttl_s=lease_ttl_s, lock_ttl_s=30, unavailable_wait_s=1)
        await replica.start()
        if hearing:
            relay = EventRelay(Hub(), store)
            relay.on_remote.append(replica.heard)
            await relay.start()
            relays.append(relay)
        core = EngineCore(_config(**eviction), backend, clock=core_clock,
                          shared=replica.host("default"))
        await core.start()
        cores.append(core)
    return cores[0], cores[1], relays


async def _end(cores: tuple[EngineCore, EngineCore], relays: list[EventRelay]) -> None:
    for relay in relays:
        await relay.close()
    await _close(*cores)


async def _steadily(core: EngineCore, key: str, gap_s: float) -> None:
    """A client of one replica asking for `key` again and again, each answered at once."""
    while True:
        (await core.acquire(key)).release()
        await asyncio.sleep(gap_s)


async def test_a_model_another_replica_serves_steadily_is_evicted_between_its_requests():
    backend = GatedBackend({A: 4, B: 4}, MANAGED)          # 4.8 GB each: one fits in 8
    one, two, relays = await _pair(backend, lease_ttl_s=3, queue_timeout_s=8)
    client = asyncio.ensure_future(_steadily(one, A, 0.05))   # A's lease never lingers
    try:
        await until(lambda: _leased(one, A))
        lease = await asyncio.wait_for(two.acquire(B), 20)      # within its queue timeout
        lease.release()
        assert B in backend.loads
        assert (await one.ctx.shared.replica.view())["leases_given_up"] >= 1
    finally:
        client.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await client
        await _end((one, two), relays)


async def _b_waits_for_a(one: EngineCore, two: EngineCore) -> tuple[Any, asyncio.Future]:
    """A served on the first replica (its lease: returned), B asked of the second, which waits
    for A's memory (its request: returned) and wants A."""
    serving = await one.acquire(A)
    await until(lambda: _resident(two, A))
    loading = asyncio.ensure_future(two.acquire(B))
    await until(lambda: _wanted(one, A))
    return serving, loading


async def _leased(core: EngineCore, key: str) -> bool:
    return core.ctx.shared.leased(key)


async def test_a_wanted_model_is_given_up_as_its_last_request_ends_not_at_the_next_batch():
    backend = GatedBackend({A: 4, B: 4}, MANAGED)
    # Batches every 10 s, and a refused eviction asks again no sooner: only the lease given up
    # at the request's end, told on the stream, lets B in within its 5 s.
    one, two, relays = await _pair(backend, lease_ttl_s=30, queue_timeout_s=5)
    try:
        serving = await one.acquire(A)
        loading = asyncio.ensure_future(two.acquire(B))
        await until(lambda: _wanted(one, A))
        assert not loading.done() and one.ctx.shared.given_up == 0
        serving.release()
        (await asyncio.wait_for(loading, 10)).release()
        assert backend.loaded == [B] and one.ctx.shared.given_up == 1
    finally:
        await _end((one, two), relays)


async def test_a_model_gone_after_its_lease_was_given_up_is_that_replicas_eviction(caplog):
    backend = GatedBackend({A: 4, B: 4}, MANAGED)
    # Nothing heard on the stream: the host's list is all this replica sees of the unload.
    one, two, relays = await _pair(backend, lease_ttl_s=30, hearing=False)
    try:
        serving = await one.acquire(A)
        await two.reconcile()                        # it sees A resident
        loading = asyncio.ensure_future(two.acquire(B))
        await until(lambda: _wanted(one, A))
        serving.release()                            # given up
        two.ctx.shared.lease_given_up(A)             # told, as the stream would
        (await asyncio.wait_for(loading, 10)).release()
        with caplog.at_level(logging.INFO, logger="proxy.engine"):
            await one.reconcile()
        assert "lab/a was unloaded by replica r2" in caplog.text
        assert one.registry.entries[A].status.value == "unloaded"
        assert sum(one.registry.entries[A].evictions.values()) == 0
    finally:
        await _end((one, two), relays)


async def _wanted(core: EngineCore, key: str) -> bool:
    """The other replica's load wants `key`, and this replica's batch has heard so."""
    await core.ctx.shared.replica.beat()
    return key in core.ctx.shared.wanted


async def test_a_model_pinned_on_the_serving_replica_is_never_given_up():
    backend = GatedBackend({A: 4, B: 4}, MANAGED)
    one, two, relays = await _pair(backend, lease_ttl_s=30, queue_timeout_s=3)
    try:
        one.pin(A, True)
        serving = await one.acquire(A)
        loading = asyncio.ensure_future(two.acquire(B))
        await until(lambda: _wanted(one, A))
        serving.release()
        await one.ctx.shared.replica.beat()                  # idle, but pinned here
        with pytest.raises(InsufficientMemory) as refused:
            await asyncio.wait_for(loading, 10)
        assert backend.loaded == [A] and "lab/a" in refused.value.message
        assert one.ctx.shared.given_up == 0
    finally:
        await _end((one, two), relays)


async def test_a_load_with_another_victim_at_hand_takes_it_and_wants_nothing():
    backend = GatedBackend({A: 3, B: 3, C: 3}, MANAGED)     # 3.6 GB each: two fit in 8
    one, two, relays = await _pair(backend, lease_ttl_s=30)
    try:
        serving = await one.acquire(A)
        (await two.acquire(C)).release()                    # idle, used here
        await until(lambda: _resident(two, A))
        (await asyncio.wait_for(two.acquire(B), 10)).release()
        assert sorted(backend.loaded) == [A, B]             # C made room; A was left alone
        await one.ctx.shared.replica.beat()
        assert A not in one.ctx.shared.wanted and one.ctx.shared.given_up == 0
        # A refused, it was passed over until the other replica's next batch.
        held_s = two.ctx.shared.remote_busy[A] - two.ctx.clock.now()
        assert 0 < held_s <= 10
        serving.release()
    finally:
        await _end((one, two), relays)


async def _resident(core: EngineCore, key: str) -> bool:
    await core.reconcile()
    return core.registry.entries[key].status.value == "loaded"


@contextlib.asynccontextmanager
async def _alone(store: Any, lease_ttl_s: float):  # noqa: ANN202
    """One replica's engine (of lab/a, 4.8 GB) on `store`; yields (core, replica, backend)."""
    replica = Replica(store, lease_ttl_s=lease_ttl_s, lock_ttl_s=30, unavailable_wait_s=1)
    await replica.start()
    backend = GatedBackend({A: 4}, MANAGED)
    core = EngineCore(_config(), backend, shared=replica.host("default"))
    await core.start()
    try:
        yield core, replica, backend
    finally:
        await core.cleanup()
        await replica.close()


class HeldRenewals:
    """A replica's view of the shared state whose lease batches wait for `go` once `hold` is
    set (its first leases pass at once)."""

    def __init__(self, inner: MemoryState) -> None:
        self.inner = inner
        self.hold = False
        self.go = asyncio.Event()
        self.renewing = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def renew_leases(self, leases, ttl_s, idle=()):  # noqa: ANN001, ANN201
        if self.hold:
            self.renewing.set()
            await self.go.wait()
        return await self.inner.renew_leases(leases, ttl_s, idle)


async def test_a_request_during_a_batch_that_gives_its_lease_up_waits_for_the_claim():
    facts = MemoryState("r2")
    store = HeldRenewals(facts.view("r1"))
    async with _alone(store, lease_ttl_s=30) as (core, replica, backend):
        try:
            (await core.acquire(A)).release()                   # leased here, idle now
            await facts.heartbeat(30)
            await facts.want_unload("default", [A], 30)
            store.hold = True
            batch = asyncio.ensure_future(replica.beat())
            await store.renewing.wait()
            request = asyncio.ensure_future(core.acquire(A))
            await until(lambda: _waits_for_lease(core, A))
            assert not request.done()                           # not served unleased meanwhile
            store.go.set()
            await batch
            assert core.ctx.shared.given_up == 1
            store.hold = False
            await replica.beat()                            # the waiting request renews nothing
            for _ in range(20):                                 # the request runs meanwhile
                await asyncio.sleep(0)
            assert await facts.claim_unload("default", A, 30) == set()   # promised: not taken back
            assert not request.done()
            for instance_id in core.registry.entries[A].instance_ids:   # r2's unload ...
                await backend.unload(instance_id)
                await facts.remove_owned("default", instance_id)
            await facts.release_unload("default", A)            # ... then its claim ends
            lease = await asyncio.wait_for(request, 10)
            assert backend.loads == [A, A]                      # gone: loaded again
            assert await facts.leased_by("default", A) == {"r1"}
            assert A not in core.ctx.shared.unloaded_by         # resident again
            lease.release()
        finally:
            store.go.set()             # a failed test leaves no batch held


async def test_a_promise_no_replica_claims_lapses_after_a_batch():
    facts = MemoryState("r2")
    async with _alone(facts.view("r1"), lease_ttl_s=6) as (core, _, backend):
        (await core.acquire(A)).release()
        await facts.heartbeat(30)
        await facts.want_unload("default", [A], 30)
        await until(lambda: _given_up(core))
        (await asyncio.wait_for(core.acquire(A), 4)).release()   # after the 2 s promise
        assert backend.loads == [A] and await facts.leased_by("default", A) == {"r1"}
        assert A not in core.ctx.shared.unloaded_by         # resident, nobody unloads it


async def _given_up(core: EngineCore) -> bool:
    return core.ctx.shared.given_up > 0


async def _waits_for_lease(core: EngineCore, key: str) -> bool:
    return core.registry.entries[key].leases == 1


class CountedWants:
    """A replica's view of the shared state that counts the wants it sends."""

    def __init__(self, inner: MemoryState) -> None:
        self.inner = inner
        self.sent: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def want_unload(self, host: str, models, ttl_s: float) -> None:  # noqa: ANN001
        self.sent.append(list(models))
        await self.inner.want_unload(host, models, ttl_s)


async def test_a_waiting_load_wants_only_models_served_elsewhere_and_once_per_batch():
    facts = MemoryState("r1")
    store = CountedWants(facts.view("r2"))
    backend = GatedBackend({A: 3, B: 3, C: 3}, MANAGED)     # 3.6 GB each: two fit in 8
    cores = []
    for s in (facts, store):
        replica = Replica(s, lease_ttl_s=30, lock_ttl_s=30, unavailable_wait_s=1)
        await replica.start()
        core = EngineCore(_config(queue_timeout_s=20), backend, shared=replica.host("default"))
        await core.start()
        cores.append(core)
    one, two = cores
    try:
        serving_a = await one.acquire(A)                    # served there
        (await one.acquire(C)).release()                    # leased there, idle
        await until(lambda: _resident(two, C))
        serving_c = await two.acquire(C)                    # and served here
        loading = asyncio.ensure_future(two.acquire(B))
        await until(lambda: _sent(store))
        for _ in range(5):                                  # more passes within the batch
            two.scheduler.kick()
            await two.scheduler.settled()
        assert store.sent == [[A]]                          # C serves here: not wanted
        await one.ctx.shared.replica.beat()
        assert one.ctx.shared.given_up == 0 and one.ctx.shared.wanted == {A}
        serving_c.release()
        serving_a.release()
        loading.cancel()                    # its end is for the tests above (no stream here)
        await asyncio.gather(loading, return_exceptions=True)
    finally:
        await _close(one, two)


async def _sent(store: CountedWants) -> bool:
    return bool(store.sent)


async def test_a_model_pinned_after_its_promise_lapsed_holds_its_lease_again():
    facts = MemoryState("r2")
    async with _alone(facts.view("r1"), lease_ttl_s=3) as (core, replica, _):
        (await core.acquire(A)).release()
        await facts.heartbeat(30)
        await facts.want_unload("default", [A], 30)       # no claim follows
        await until(lambda: _given_up(core))
        await until(lambda: _unpromised(core, A))         # a batch later
        core.pin(A, True)
        await replica.beat()
        assert await facts.leased_by("default", A) == {"r1"}


async def _unpromised(core: EngineCore, key: str) -> bool:
    return key not in core.ctx.shared.promised()


@pytest.mark.parametrize("beaten", [False, True], ids=["before-its-heartbeat",
                                                      "after-its-heartbeat"])
async def test_after_redis_restarts_empty_a_waiting_load_evicts_nothing_still_served(
        redis_server, beaten):  # noqa: F811
    # Redis lost every lease with its data; the replica serving A puts its lease back only at
    # its next batch. The waiting replica must not take A for unserved meanwhile: that
    # eviction would cut A's generation (LM Studio ends what an unloaded model generates).
    backend = GatedBackend({A: 4, B: 4}, MANAGED)          # 4.8 GB each: one fits in 8
    clock = ManualClock()
    cores = []
    for name, core_clock in (("r1", None), ("r2", clock)):
        replica = Replica(create_state(redis_server.url, replica_id=name), lease_ttl_s=30,
                          lock_ttl_s=30, unavailable_wait_s=5)     # batches every 10 s
        await replica.start()
        core = EngineCore(_config(queue_timeout_s=60), backend, clock=core_clock,
                          shared=replica.host("default"))
        await core.start()
        cores.append(core)
    one, two = cores
    try:
        serving = await one.acquire(A)                     # a generation under way there
        await until(lambda: _resident(two, A))
        loading = asyncio.ensure_future(two.acquire(B))
        await until(lambda: _refused(two, A))              # A serves through the other
        redis_server.stop()
        redis_server.start()                               # empty
        if beaten:          # its heartbeat finds the state lost it: one batch is not enough
            await until(lambda: _beaten(two))
        clock.advance(60)                                  # the refusal's hold is over
        two.scheduler.kick()
        await two.scheduler.settled()
        assert backend.loaded == [A] and not loading.done()
        assert one.registry.entries[A].status.value == "loaded"
        serving.release()
        loading.cancel()
    finally:
        await _close(one, two)
        for core in cores:
            await core.ctx.shared.replica.store.close()


async def _refused(core: EngineCore, key: str) -> bool:
    return key in core.ctx.shared.remote_busy


async def _beaten(core: EngineCore) -> bool:
    replica = core.ctx.shared.replica
    await replica.beat()                  # the first may meet the restart: asked again
    return replica.ok


async def test_a_load_under_way_as_redis_restarts_empty_puts_its_reservation_back(
        redis_server):  # noqa: F811
    # Its reservation went with Redis's data: until it is back, another replica would find the
    # loading model's room free, load into it too, and the server refuse one of the loads.
    backend = GatedBackend({A: 4, B: 4}, MANAGED)          # 4.8 GB each: one fits in 8
    backend.gates[A] = asyncio.Event()
    replica = Replica(create_state(redis_server.url, replica_id="r1"), lease_ttl_s=30,
                      lock_ttl_s=30, unavailable_wait_s=5)
    await replica.start()
    core = EngineCore(_config(), backend, shared=replica.host("default"))
    await core.start()
    probe = create_state(redis_server.url, replica_id="r2")
    try:
        loading = asyncio.ensure_future(core.acquire(A))
        await backend.started.setdefault(A, asyncio.Event()).wait()    # reserved, loading
        need = int(core.registry.footprint_bytes(core.registry.entries[A]))
        assert await probe.reserved_bytes("default") == need
        redis_server.stop()
        redis_server.start()                                # empty
        await until(lambda: _beaten(core))                  # it finds the state lost it
        assert await probe.reserved_bytes("default") == need
        assert not (await probe.reserve("default", B, need, 8 * 10**9, 30)).granted
        backend.gates[A].set()
        (await asyncio.wait_for(loading, 10)).release()
    finally:
        backend.gates[A].set()
        await core.cleanup()
        await replica.close()
        await replica.store.close()
        await probe.close()


class LostReply(HeldRenewals):
    """A view whose lease batch, once `hold` is set, reaches the state, which may give leases
    up, but whose reply is lost (the state then unreachable)."""

    async def renew_leases(self, leases, ttl_s, idle=()):  # noqa: ANN001, ANN201
        renewal = await self.inner.renew_leases(leases, ttl_s, idle)
        if self.hold:
            raise StateUnavailable("shared state unavailable: Redis at redis://r:6379 failed")
        return renewal


async def test_a_lease_whose_renewal_lost_its_reply_is_not_taken_unasked():
    facts = MemoryState("r2")
    store = LostReply(facts.view("r1"))
    async with _alone(store, lease_ttl_s=30) as (core, replica, _):
        (await core.acquire(A)).release()                   # leased here, idle now
        await facts.heartbeat(30)
        await facts.want_unload("default", [A], 30)
        assert core.ctx.shared.leased(A)
        store.hold = True
        await replica.beat()                                # gave it up; the reply was lost
        assert await facts.leased_by("default", A) == set()
        assert not core.ctx.shared.leased(A)                # the next request asks first
