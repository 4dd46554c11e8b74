"""A load its requester performs itself (an LM Studio SDK client's `loadModel` through the
proxy), once the scheduler admitted it: the requester reports the outcome exactly once —
loaded, failed (the server's answer), or left (the requester went away before an answer,
which says nothing about the model)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ModelLoadFailed

if TYPE_CHECKING:
    from .loader import Loader
    from .queue import Pending
    from .scheduler import Scheduler


class MediatedLoad:
    """An admitted load that its requester performs; report exactly once."""

    def __init__(self, loader: "Loader", scheduler: "Scheduler", pending: "Pending",
                 owner: str) -> None:
        self._loader, self._scheduler, self._pending, self.owner = \
            loader, scheduler, pending, owner
        self.key = pending.entry.key
        self.reported = False

    def loaded(self, instance_id: str) -> None:
        if not self.reported:
            self.reported = True
            self._loader.mediated_loaded(self._pending.entry, instance_id, self.owner)
            self._scheduler.finish_mediated(self._pending, None)

    def failed(self, message: str) -> None:
        if not self.reported:
            self.reported = True
            error = ModelLoadFailed(message)
            self._loader.mediated_failed(self._pending.entry, error)
            self._scheduler.finish_mediated(self._pending, error)

    def left(self, sent: bool) -> None:
        """The requester went away before the server answered: no failure of the model's.
        `sent`: the load reached the server, which may still finish it."""
        if not self.reported:
            self.reported = True
            self._loader.mediated_left(self._pending.entry, sent)
            self._scheduler.finish_mediated(self._pending, None)
