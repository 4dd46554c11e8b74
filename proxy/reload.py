"""Hot reload (SIGHUP, POST /proxy/reload): validate the new configuration first, then apply it
without unloading any model.

Applied at once: models (priorities, pins, TTLs, aliases, load options, footprints), memory
thresholds and budget, eviction policy and its settings (native.evict too), auth keys, health
thresholds, log level. Read only at start (named in the log and the answer as needing a
restart): `server.*`, `upstream.*`, `storage.*`, the memory sampler kind, the loop intervals
and `native.max_frame_bytes`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from aiohttp import web

from .config import Config, redact_url
from .errors import ConfigError

log = logging.getLogger("proxy.reload")

RESTART_SECTIONS = ("server", "upstream", "storage")
RESTART_FIELDS = ("memory.sampler", "memory.monitoring_interval", "health.interval_s",
                  "health.probe_interval_s", "health.webhook_url", "native.max_frame_bytes")


class Reloader:
    """Holds the running config and how to read a new one (the CLI's flags + env + file)."""

    def __init__(self, config: Config, source: Callable[[], Config] | None) -> None:
        self.current = config
        self.source = source

    def reload(self, app: web.Application) -> dict[str, Any]:
        """Read, validate and apply; on any problem keep the running config and say why."""
        if self.source is None:
            return {"reloaded": False, "problems": ["this proxy was not started from the "
                                                    "command line: nothing to reload from"]}
        try:
            new = self.source()
        except ConfigError as exc:
            log.error("reload rejected, the running configuration stays (%d problem(s)):",
                      len(exc.problems))
            for problem in exc.problems:
                log.error("  %s", problem)
            return {"reloaded": False, "problems": exc.problems}
        restart = restart_needed(self.current, new)
        apply(app, new)
        self.current = new
        log.info("configuration reloaded%s", "" if not restart else
                 "; these changes need a restart to take effect: " + ", ".join(restart))
        return {"reloaded": True, "restart_needed": restart}


def apply(app: web.Application, config: Config) -> None:
    from .keys import AUTH, ENGINE, HEALTH
    app[ENGINE].apply_config(config)
    app[AUTH].apply(config)
    app[HEALTH].config = config.health
    logging.getLogger().setLevel(config.logging.level)


def restart_needed(old: Config, new: Config) -> list[str]:
    """Dotted paths whose new value only a restart would use, with old → new."""
    paths = [f"{section}.{f.name}" for section in RESTART_SECTIONS
             for f in dataclasses.fields(getattr(old, section))] + list(RESTART_FIELDS)
    changed = []
    for path in paths:
        a, b = _get(old, path), _get(new, path)
        if a != b:
            if path.endswith("url"):
                a, b = (redact_url(v) if v else v for v in (a, b))
            secret = "token" in path
            changed.append(path if secret else f"{path} ({a!r} → {b!r})")
    return changed


def _get(config: Config, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


RELOADER = web.AppKey("reloader", Reloader)
