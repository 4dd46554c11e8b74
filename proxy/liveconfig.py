"""The running configuration: one holder that everything reads through, swapped whole by a reload.

`current` is the Config in force. `swap(new)` replaces it in one step on the event loop, with no
await inside, so a request or a loop reads either the old config or the new one, never a mix.
Views too costly to compute per request (the alias map, the key ring) are `derive`d: built from
the config now and rebuilt by every swap before it commits, so a build that raises leaves the
old config and every view in place. Parts that must act on a change (the memory gauge's
thresholds, a queue to wake, the log level) register `on_swap`, called after the commit.
Nothing else keeps a copy of a section.
"""
from __future__ import annotations

import logging
from typing import Callable, Generic, TypeVar

from .config import Config

log = logging.getLogger("proxy.config")
T = TypeVar("T")


class View(Generic[T]):
    """A value derived from the current config; `value` is rebuilt by every swap."""

    __slots__ = ("build", "value")

    def __init__(self, build: Callable[[Config], T], value: T) -> None:
        self.build = build
        self.value = value


class LiveConfig:
    """`current` and `aliases` are plain attributes, read on every request: read them, never
    assign them; `swap` is the only writer."""

    def __init__(self, config: Config) -> None:
        self.current = config
        self._views: list[View] = []
        self._swapped: list[Callable[[Config, Config], None]] = []
        self._aliases = self.derive(Config.alias_map)
        # Alias → model key, as the current config says (every lookup of a name uses this).
        self.aliases: dict[str, str] = self._aliases.value

    @staticmethod
    def of(config: "Config | LiveConfig") -> "LiveConfig":
        """The holder itself, or a new one for a plain Config (the engine as a library)."""
        return config if isinstance(config, LiveConfig) else LiveConfig(config)

    def derive(self, build: Callable[[Config], T]) -> View[T]:
        view = View(build, build(self.current))
        self._views.append(view)
        return view

    def on_swap(self, callback: Callable[[Config, Config], None]) -> None:
        """`callback(old, new)` after each swap; it must not await (the swap is one step)."""
        self._swapped.append(callback)

    def swap(self, new: Config) -> Config:
        """Put `new` in force with every view rebuilt from it; returns the config it replaced.
        A view that cannot be built from `new` raises here, and nothing has changed."""
        values = [view.build(new) for view in self._views]
        old, self.current = self.current, new
        for view, value in zip(self._views, values):
            view.value = value
        self.aliases = self._aliases.value
        for callback in self._swapped:
            try:
                callback(old, new)
            except Exception:   # one part's bug must not leave the others on the old config
                log.exception("applying the new configuration failed in %r", callback)
        return old
