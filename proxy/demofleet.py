"""`python -m proxy --demo --hosts N`: a fleet to try on one machine — N LM Studio emulators,
each a host of its own with its own memory and load speed (as a workstation, a Mac and a small
box would differ), and the proxy in front of them with `upstreams:` listing them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .engine.memory import GB

MAX_HOSTS = 8
# (memory GB, load-time factor): the first host the roomiest and quickest, the last the
# smallest and slowest; past three the pattern repeats.
SHAPES = ((24.0, 1.0), (16.0, 1.5), (8.0, 2.0))
BASE_LOAD_TIME_SCALE = 0.25   # the single-server demo's: catalogue load times × 0.25


@dataclass(frozen=True)
class DemoHost:
    name: str
    memory_gb: float
    load_factor: float          # its loads take this many times the base load time


def demo_hosts(n: int) -> list[DemoHost]:
    if not 1 <= n <= MAX_HOSTS:
        raise ValueError(f"--hosts: must be 1..{MAX_HOSTS} (got {n})")
    return [DemoHost(f"host-{i + 1}", *SHAPES[i % len(SHAPES)]) for i in range(n)]


async def start_demo_fleet(hosts: list[DemoHost], tokens_per_s: float = 30.0) -> list[Any]:
    """One emulator per host on a free port; closes those started if one cannot start."""
    from .emulator import EmulatorOptions, start_emulator
    started: list[Any] = []
    try:
        for h in hosts:
            started.append(await start_emulator(
                load_time_scale=BASE_LOAD_TIME_SCALE * h.load_factor,
                capacity_bytes=int(h.memory_gb * GB),
                options=EmulatorOptions(tokens_per_s=tokens_per_s)))
    except BaseException:
        for emu in started:
            await emu.close()
        raise
    return started


def upstreams(hosts: list[DemoHost], emulators: list[Any]) -> list[dict[str, Any]]:
    """The `upstreams:` of the proxy in front of them: each host's memory as its budget."""
    return [{"name": h.name, "url": emu.url, "budget_gb": h.memory_gb}
            for h, emu in zip(hosts, emulators)]


def hosts_lines(hosts: list[DemoHost], emulators: list[Any]) -> str:
    return "\n".join(f"  {h.name:<8} {h.memory_gb:>4.0f} GB  loads ×{h.load_factor:.1f}  "
                     f"{emu.url}" for h, emu in zip(hosts, emulators))
