"""What the replicas learned, kept in Redis (redis.py's RedisState mixes it in): measured
footprints and load times per (host, model), and usage patterns per host.

    learned:<host>           hash  "<model>|footprint" / "<model>|load" → "<at_ms> <value> <replica>"
    patterns:<host>          hash  model → its usage pattern (engine/learning.py's snapshot)
"""
from __future__ import annotations

from typing import Any, Mapping

import orjson

from .base import Learned, Measured, readable_patterns
from .redis_calls import _guarded, _ms

LEARNED_KINDS = ("footprint", "load")   # hash field suffixes: Learned's fields


class LearnedFacts:
    """Mixed into RedisState: its client, scripts (`_s`), key names (`_key`) and replica id."""

    @_guarded
    async def put_learned(self, host: str, model: str, *, footprint_bytes: float | None = None,
                          load_s: float | None = None, ttl_s: float) -> int:
        return int(await self._s["PUT_LEARNED"](
            keys=[self._key("learned", host)],
            args=[model, self.replica_id, "" if footprint_bytes is None else repr(
                float(footprint_bytes)), "" if load_s is None else repr(float(load_s)),
                _ms(ttl_s)]))

    @_guarded
    async def learned(self, host: str) -> dict[str, Learned]:
        found: dict[str, dict[str, Measured]] = {}
        for name, raw in (await self.client.hgetall(self._key("learned", host))).items():
            model, _, kind = name.rpartition("|")
            at_ms, value, by = raw.split(" ", 2)
            if kind in LEARNED_KINDS:
                found.setdefault(model, {})[kind] = Measured(float(value), int(at_ms), by)
        return {m: Learned(**d) for m, d in found.items()}

    @_guarded
    async def put_patterns(self, host: str, patterns: Mapping[str, dict[str, Any]],
                           ttl_s: float) -> None:
        if not patterns:
            return
        key = self._key("patterns", host)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={model: orjson.dumps(p) for model, p in patterns.items()})
        pipe.pexpire(key, _ms(ttl_s))
        await pipe.execute()

    @_guarded
    async def patterns(self, host: str) -> dict[str, dict[str, Any]]:
        return readable_patterns(await self.client.hgetall(self._key("patterns", host)))
