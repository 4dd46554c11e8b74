"""Every state transition, allowed or not, goes through one table."""
from __future__ import annotations

import itertools

import pytest

from proxy.engine.lifecycle import (OWNER_PROXY, TRANSITIONS, IllegalTransition, Lease,
                                    ModelEntry, ModelStatus, transition)

PAIRS = [(a, b) for a, b in itertools.product(ModelStatus, ModelStatus) if a is not b]


@pytest.mark.parametrize("old,new", PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_transition_follows_the_table(old, new):
    entry = ModelEntry("m", status=old)
    if new in TRANSITIONS[old]:
        assert transition(entry, new) is old and entry.status is new
    else:
        with pytest.raises(IllegalTransition):
            transition(entry, new)
        assert entry.status is old


def test_unloading_clears_settled_and_unloaded_forgets_instances():
    entry = ModelEntry("m", status=ModelStatus.LOADED, instance_ids=("m",), owner=OWNER_PROXY)
    transition(entry, ModelStatus.UNLOADING)
    assert not entry.settled.is_set()
    transition(entry, ModelStatus.UNLOADED)
    assert entry.settled.is_set() and entry.instance_ids == () and not entry.owned


def test_lease_counts_and_releases_once():
    released = []
    entry = ModelEntry("m", status=ModelStatus.LOADED)
    a, b = Lease(entry, released.append), Lease(entry, released.append)
    assert entry.leases == 2 and not entry.drained.is_set()
    a.release()
    a.release()
    assert entry.leases == 1 and released == [a]
    b.release()
    assert entry.leases == 0 and entry.drained.is_set()
