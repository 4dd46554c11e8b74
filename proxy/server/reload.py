"""Hot reload (SIGHUP, POST /proxy/reload): validate the new configuration first, then swap it
into the app's one live holder (`app[CONFIG]`) without unloading any model.

Everything reads the config through that holder, so a swap applies every key at once, except
those in START_ONLY: they are read once, when the server, the upstream client or the store is
set up. A change to one of them is named in the log and the answer as needing a restart, and
its running value stays in force (in `app[CONFIG].current` too), so that nothing reads a value
the process is not using. The log names the keys a reload changed (changed.py: no secrets).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from aiohttp import web

from .auth import exposure_problems
from .changed import changed_keys
from ..config import Config
from ..configload import replace_config
from ..configcheck import one_server_host_problems
from ..urls import redact_url
from ..errors import ConfigError

log = logging.getLogger("proxy.reload")

# Whole sections or single keys; the one list of what a reload cannot apply.
START_ONLY = (
    "server.host", "server.port", "server.event_loop", "server.allow_unauthenticated",
    "server.max_body_bytes",                # aiohttp's client_max_size, set when the app is made
    "server.shutdown_timeout_s",            # the runner's own deadline, set at start
    "server.header_timeout_s", "server.keepalive_timeout_s", "server.max_connections",
    "upstream",                             # the client, its pool, breaker and timeouts
    "upstreams",                            # a fleet's hosts: each its client and engine
    "placement.native_host",                # SDK clients' websocket relay, set up once
    "storage",                              # the SQLite file and its flush loop
    "state",                                # the Redis connection and the replica's loop
    "memory.sampler",                       # the sampler object
    "compat.models_retrieve",               # a route, registered once
)


class Reloader:
    """How to read the configuration anew (the CLI's flags + env + file); the running one is
    `app[CONFIG]`, and only there."""

    def __init__(self, source: Callable[[], Config] | None) -> None:
        self.source = source

    def reload(self, app: web.Application) -> dict[str, Any]:
        """Read, validate and apply; on any problem keep the running config and say why."""
        from .keys import CONFIG
        if self.source is None:
            return {"reloaded": False, "problems": ["this proxy was not started from the "
                                                    "command line: nothing to reload from"]}
        live = app[CONFIG]
        try:
            new = self.source()
            effective = keep_start_only(live.current, new)
            changed = changed_keys(live.current, effective)
            live.swap(effective)
        except ConfigError as exc:
            log.error("reload rejected, the running configuration stays (%d problem(s)):",
                      len(exc.problems))
            for problem in exc.problems:
                log.error("  %s", problem)
            return {"reloaded": False, "problems": exc.problems}
        restart = restart_needed(effective, new)
        log.info("configuration reloaded; %s%s",
                 "changed: " + ", ".join(changed) if changed else "nothing changed",
                 "" if not restart else
                 "; these changes need a restart to take effect: " + ", ".join(restart))
        return {"reloaded": True, "restart_needed": restart}


def start_only_paths(config: Config) -> list[str]:
    """START_ONLY with each section spelled out key by key."""
    paths: list[str] = []
    for entry in START_ONLY:
        if "." in entry or isinstance(getattr(config, entry), tuple):
            paths.append(entry)   # a key, or a list compared whole
        else:
            paths += [f"{entry}.{f.name}" for f in dataclasses.fields(getattr(config, entry))]
    return paths


def restart_needed(old: Config, new: Config) -> list[str]:
    """Dotted paths whose new value only a restart would use, with old → new."""
    changed = []
    for path in start_only_paths(old):
        a, b = _get(old, path), _get(new, path)
        if a != b:
            if path == "upstreams":   # named by host; a host's URL and token are not shown
                changed.append(f"upstreams ({', '.join(h.name for h in a) or 'none'} → "
                               f"{', '.join(h.name for h in b) or 'none'}, or a host changed)")
                continue
            if path.endswith("url"):
                a, b = (redact_url(v) if v else v for v in (a, b))
            secret = "token" in path
            changed.append(path if secret else f"{path} ({a!r} → {b!r})")
    return changed


def keep_start_only(running: Config, new: Config) -> Config:
    """`new` with the start-only keys as they run: the config a reload puts in force. It is
    validated as a whole (ConfigError), since a running key may not fit the new ones: a
    non-loopback server.host with the client keys removed, a budget sampler without a budget."""
    merged = new
    for path in start_only_paths(running):
        if "." not in path:       # a list, kept whole
            merged = dataclasses.replace(merged, **{path: _get(running, path)})
            continue
        section, name = path.split(".")
        merged = dataclasses.replace(merged, **{section: dataclasses.replace(
            getattr(merged, section), **{name: _get(running, path)})})
    if merged == new:
        return new
    try:
        merged = replace_config(merged, {})
    except ConfigError as exc:
        # One server still runs while the file lists hosts: the hosts it names for models and
        # tasks wait, unused, for the restart that starts the fleet.
        waiting = set(one_server_host_problems(merged)) if new.upstreams else set()
        kept = [p for p in exc.problems if p not in waiting]
        if kept:
            raise ConfigError([f"{p} (with the settings that need a restart as they run)"
                               for p in kept]) from None
    problems = exposure_problems(merged)[0]
    if problems:
        raise ConfigError([f"{p} (server.host as it runs)" for p in problems])
    return merged


def _get(config: Config, dotted: str) -> Any:
    section, _, name = dotted.partition(".")
    return getattr(getattr(config, section), name) if name else getattr(config, section)


RELOADER = web.AppKey("reloader", Reloader)
