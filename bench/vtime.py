"""An asyncio event loop on virtual time: when nothing is ready, time jumps to the next timer.

The real engine (acquire, admission, policy, single-flight loads, asyncio.timeout deadlines) runs
unchanged on it; a day of traffic replays in seconds and every run is exactly reproducible.
"""
from __future__ import annotations

import asyncio
import selectors


class _JumpingSelector(selectors.BaseSelector):
    """Never reports I/O; "waiting" for `timeout` seconds just advances the loop's clock."""

    def __init__(self) -> None:
        self._map: dict = {}
        self.loop: VirtualTimeLoop | None = None

    def register(self, fileobj, events, data=None):  # type: ignore[no-untyped-def]
        key = selectors.SelectorKey(fileobj, fileobj if isinstance(fileobj, int)
                                    else fileobj.fileno(), events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj):  # type: ignore[no-untyped-def]
        return self._map.pop(fileobj)

    def modify(self, fileobj, events, data=None):  # type: ignore[no-untyped-def]
        self.unregister(fileobj)
        return self.register(fileobj, events, data)

    def select(self, timeout=None):  # type: ignore[no-untyped-def]
        if timeout is None:
            raise RuntimeError("virtual-time deadlock: tasks are waiting but no timer is set")
        assert self.loop is not None
        self.loop.now_s += timeout
        return []

    def get_map(self):  # type: ignore[no-untyped-def]
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start_s: float = 0.0) -> None:
        selector = _JumpingSelector()
        self.now_s = start_s
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self.now_s


class LoopClock:
    """The engine's Clock reading the virtual loop's time."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop

    def now(self) -> float:
        return self._loop.now_s

    def wall(self) -> float:
        return self._loop.now_s
