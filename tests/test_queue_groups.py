"""The admission queue's answers for an exclusive group's member (engine/queue.py): a load under
way past the deadline is 'still loading', whichever rival appeared meanwhile."""
from __future__ import annotations

import asyncio

import pytest

from proxy.errors import UpstreamTimeout

from .test_groups import SWAP, X, Y, lab, manager  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(30)


async def test_a_member_still_loading_past_the_deadline_is_a_timeout_not_a_group_refusal(
        lab, manager):
    mgr, rec = await manager(lab.url, [SWAP], eviction={"queue_timeout_s": 0.3})
    gate = lab.state.faults.load_gate[X] = asyncio.Event()   # LM Studio takes its time
    request = asyncio.create_task(mgr.acquire(X))
    await lab.state.wait_for(lambda: lab.state.loading[X] == 1)
    await lab.state.load(Y)                      # its rival, loaded in LM Studio's GUI
    await mgr.core.reconcile()
    with pytest.raises(UpstreamTimeout) as slow:
        await request                            # admitted: its load, not Y, is the wait
    assert "still loading" in slow.value.message
    gate.set()
