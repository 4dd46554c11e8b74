"""Several servers behind one proxy: one engine per host (fleet/hosts.py), the placer above
them (fleet/placer.py), and the fleet that is the proxy's engine (fleet/fleet.py)."""
from __future__ import annotations

import random

from ..engine.clock import Clock
from ..engine.core import EngineCore
from ..engine.replica import Replica
from ..liveconfig import LiveConfig
from ..storage import configured_store
from ..upstream import create_upstream
from .fleet import Fleet
from .hosts import Host, host_config, host_upstream

__all__ = ["Fleet", "Host", "create_fleet"]


def create_fleet(live: LiveConfig, *, clock: Clock | None = None,
                 rng: random.Random | None = None, replica: Replica | None = None) -> Fleet:
    """One engine per host of `upstreams:`, each with its backend and history file."""
    config = live.current
    hosts = []
    for i, spec in enumerate(config.upstreams):   # read at start only: the index stays
        narrowed = LiveConfig(host_config(config, spec))
        backend = create_upstream(host_upstream(spec))
        core = EngineCore(narrowed, backend, clock=clock,
                          store=configured_store(narrowed.current.storage), host_name=spec.name,
                          host_path=f"upstreams[{i}]",
                          shared=replica.host(spec.name) if replica is not None else None)
        hosts.append(Host(spec, core, backend, narrowed))
    return Fleet(live, hosts, rng=rng, replica=replica)
