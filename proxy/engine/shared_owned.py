"""Which instances on a host the fleet loaded (engine/shared.py): on every replica they are the
proxy's to evict, not "loaded outside the proxy".

The record is in the shared state (`owned:<host>`): the replica whose load made an instance
writes it, the one that unloads it removes it. Redis may lose it while the host still holds the
instance (restarted empty, or away when the load ended); then the replicas disagree, and one
that counts the model as someone else's refuses to evict it. So each reconcile, having read the
record before the host's list, writes back the instances of the proxy's models that the host
lists and the record lacks, and tells the other replicas (an `owned` event on the replicas'
stream) to look again. Only instances known to be the fleet's are written: loaded by this
replica (its accounting), or in the record as last read; not one someone else added beside
the proxy's (the GUI's second instance). Reading the record first means an instance the list
shows was resident after the record was read: a copy another replica unloaded before that is
not written back.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterable

from ..errors import StateUnavailable
from ..state import StateStore
from .lifecycle import OWNER_PROXY, ModelStatus

if TYPE_CHECKING:
    from .lifecycle import ModelEntry

log = logging.getLogger("proxy.shared")
OWNED_EVENT = "owned"     # the replicas' stream: a replica wrote the fleet's record back


class FleetOwned:
    def __init__(self, store: StateStore, host: str) -> None:
        self.store = store
        self.host = host
        self.by_instance: dict[str, str] = {}     # instance id → model, as last read
        self._before: dict[str, str] = {}         # ... as read the time before
        self.restored = 0                         # instances written back

    async def refresh(self) -> bool:
        """The record read anew; False while the state is away (the last reading stays)."""
        try:
            found = await self.store.owned(self.host)
        except StateUnavailable:
            return False
        self._before, self.by_instance = self.by_instance, found
        return True

    def has(self, key: str, instance_ids: tuple[str, ...]) -> bool:
        return any(self.by_instance.get(i) == key for i in instance_ids)

    async def loaded(self, instance_id: str, key: str, token: int | None) -> None:
        """This replica's load made the instance (under the load lock holding `token`)."""
        try:
            if not await self.store.add_owned(self.host, instance_id, key, fence=token):
                log.warning("%s on %s loaded after its load lock lapsed; the host's list "
                            "decides who holds it", key, self.host)
        except StateUnavailable:
            return            # not recorded: the next reconcile after Redis returns writes it
        self.by_instance[instance_id] = key

    async def unloaded(self, instance_ids: Iterable[str]) -> None:
        try:
            for i in instance_ids:
                await self.store.remove_owned(self.host, i)
                self.by_instance.pop(i, None)
        except StateUnavailable:
            pass

    async def record(self, key: str, instance_ids: Iterable[str]) -> None:
        """Written (again) as the fleet's. Raises StateUnavailable."""
        for i in instance_ids:
            await self.store.add_owned(self.host, i, key)
            self.by_instance[i] = key

    async def restore(self, entries: dict[str, "ModelEntry"],
                      loaded_here: Callable[[str, tuple[str, ...]], bool]) -> None:
        """After a reconcile that read the record (refresh, True) and then the host's list:
        the proxy's resident instances that the record lacks and that are known to be the
        fleet's (`loaded_here(key, (instance,))`, or in the record as read before), written
        back."""
        lost = {e.key: ids for e in entries.values()
                if e.status is ModelStatus.LOADED and e.owner == OWNER_PROXY
                if (ids := [i for i in e.instance_ids if self.by_instance.get(i) != e.key and (
                    loaded_here(e.key, (i,)) or self._before.get(i) == e.key)])}
        try:
            for key, ids in lost.items():
                await self.record(key, ids)
                self.restored += len(ids)
                log.info("%s on %s is the fleet's: recorded again (the shared state had "
                         "lost it)", key, self.host)
                await self.changed(key)
        except StateUnavailable:
            pass              # the next reconcile tries again

    async def changed(self, key: str) -> None:
        """The other replicas look at the host again (the record of `key` changed)."""
        await self.store.append_event(OWNED_EVENT, {
            "host": self.host, "model": key, "replica": self.store.replica_id})
