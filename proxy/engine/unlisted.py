"""Names in the configuration that the server does not list: a model's settings (`models.<key>`,
a pin among them), a `tasks:` entry, a group's member. --check cannot know the model list, so
they are judged once the server has answered with it (after a reconcile), and each is logged
once, as a warning, not at every reconcile; an entry a reload adds is judged at the next.

A fleet judges an entry that names a host by that host's list, any other by every host that
may hold the model, once each of them has answered (fleet/fleet.py)."""
from __future__ import annotations

import logging
from typing import Callable, Iterator

from ..config import Config, TaskModel

log = logging.getLogger("proxy.config")

# (name, host or None) → is the model listed (there); None: not known yet (no answer).
Listed = Callable[[str, str | None], bool | None]


def named_models(config: Config) -> Iterator[tuple[str, str, str | None]]:
    """(entry's path, the model name it gives, the host it names) for every entry that names
    a model."""
    for key, m in config.models.items():
        yield f"models.{key}", key, m.host
    for task, entries in config.tasks.items():
        for i, e in enumerate(entries):
            name, host = (e.model, e.host) if isinstance(e, TaskModel) else (e, None)
            yield f"tasks.{task}[{i}]", name, host
    for i, g in enumerate(config.groups):
        for member in g.members:
            yield f"groups[{i}].members", member, None


class Unlisted:
    def __init__(self, server: str = "the server") -> None:
        self.server = server          # how the warning names where the list comes from
        self._warned: set[tuple[str, str, str | None]] = set()

    def check(self, config: Config, listed: Listed) -> list[str]:
        """Warn of each entry whose model is known not to be listed, once; returns the new
        warnings."""
        said = []
        for path, name, host in named_models(config):
            if (path, name, host) in self._warned or listed(name, host) is not False:
                continue
            self._warned.add((path, name, host))
            whose = f"host '{host}'" if host else self.server
            said.append(f"{path}: '{name}' is not a model {whose} lists (a typo, or not "
                        "downloaded there?); until it is, this entry has no effect")
        for warning in said:
            log.warning("%s", warning)
        return said
