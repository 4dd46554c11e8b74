"""What a soak watches, and whether it stayed flat: each replica's RSS and open file descriptors,
and the shared Redis's key count (DBSIZE), its memory and the event stream's length.

Flat means: the median of the last fifth of the run is within a margin of the median of the
second fifth (the first fifth is warm-up: allocator arenas, pools and caches filling). The
margins are in MARGINS: a relative one, and an absolute one for the small numbers (a few fds,
a few keys). A leak — one more key or fd per load, a few kB per request — overshoots them
within minutes at the soak's rates.
"""
from __future__ import annotations

import statistics
from typing import Any

import psutil

# series → (relative, absolute) margin: flat when late ≤ early × (1 + relative) + absolute
MARGINS = {"rss_mb": (0.05, 2.0), "open_fds": (0.0, 4.0), "redis_keys": (0.0, 3.0)}


class Sampler:
    def __init__(self, pids: list[int], redis_port: int | None, prefix: str) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.redis = None
        if redis_port is not None:
            import redis
            self.redis = redis.Redis(port=redis_port, decode_responses=True)
        self.prefix = prefix
        self.samples: list[dict[str, Any]] = []

    def sample(self, label: str, t_s: float | None) -> dict[str, Any]:
        s: dict[str, Any] = {"at": label, "t_s": None if t_s is None else round(t_s, 1),
                             "replicas": [{"rss_mb": round(p.memory_info().rss / 1e6, 1),
                                           "open_fds": p.num_fds(),
                                           "connections": len(p.net_connections())}
                                          for p in self.procs]}
        if self.redis is not None:
            s["redis_keys"] = self.redis.dbsize()
            s["redis_mb"] = round(self.redis.info("memory")["used_memory"] / 1e6, 2)
            s["events_len"] = self.redis.xlen(self.prefix + "events")
        self.samples.append(s)
        return s

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()


def series(samples: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """name → [(t_s, value)] over the timed samples (not the end/idle ones after the run)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        if s["t_s"] is None:
            continue
        for i, r in enumerate(s["replicas"]):
            for key in ("rss_mb", "open_fds"):
                out.setdefault(f"replica {i + 1} {key}", []).append((s["t_s"], r[key]))
        for key in ("redis_keys", "redis_mb", "events_len"):
            if key in s:
                out.setdefault(key, []).append((s["t_s"], s[key]))
    return out


def verdict(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per series: first, last, max, the early and late medians, and flat (where judged).
    The fifths are of the sampled span (start to the last sample under load)."""
    out = {}
    duration_s = max((s["t_s"] for s in samples if s["t_s"] is not None), default=0.0)
    for name, points in series(samples).items():
        values = [v for _, v in points]
        early = [v for t, v in points if 0.2 * duration_s <= t < 0.4 * duration_s]
        late = [v for t, v in points if t >= 0.8 * duration_s]
        row: dict[str, Any] = {"first": values[0], "last": values[-1], "max": max(values)}
        if early and late:
            row["early_median"] = statistics.median(early)
            row["late_median"] = statistics.median(late)
        margin = next((m for k, m in MARGINS.items() if name.endswith(k)), None)
        if margin is not None and early and late:
            rel, absolute = margin
            row["flat"] = row["late_median"] <= row["early_median"] * (1 + rel) + absolute
        out[name] = row
    return out


def render(result: dict[str, Any]) -> str:
    rows = ["| series | first | last | max | median, 2nd fifth | median, last fifth | flat |",
            "|---|---|---|---|---|---|---|"]
    for name, r in result["verdict"].items():
        flat = {True: "yes", False: "**no**", None: "(recorded)"}[r.get("flat")]
        rows.append(f"| {name} | {r['first']:g} | {r['last']:g} | {r['max']:g} | "
                    f"{r.get('early_median', float('nan')):g} | "
                    f"{r.get('late_median', float('nan')):g} | {flat} |")
    judged = [r["flat"] for r in result["verdict"].values() if "flat" in r]
    rows += ["", "verdict: " + ("flat" if judged and all(judged) else "NOT flat") + " — "
             + "; ".join(f"{k}: last-fifth median ≤ second-fifth median × {1 + rel:g} + {a:g}"
                         for k, (rel, a) in MARGINS.items())]
    after = [s for s in result["samples"] if s["t_s"] is None]
    for s in after:
        rows.append(f"{s['at']}: " + ", ".join(
            f"replica {i + 1} {r['rss_mb']} MB/{r['open_fds']} fds"
            for i, r in enumerate(s["replicas"]))
            + (f", Redis {s['redis_keys']} keys/{s['redis_mb']} MB" if "redis_keys" in s else ""))
    return "\n".join(rows)
