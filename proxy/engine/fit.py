"""Fit by context: a model that does not fit at its configured context is loaded with the
largest smaller one that does (`models.<key>.fit.min_context_length`), instead of evicting.

The rule, applied by admission (engine/scheduler.py) to a model with `fit` whose configured
footprint is more than the memory free for it now:
1. the largest context ≥ min_context_length whose memory fits into what is free now: loaded
   with it, nothing evicted;
2. else, if the model fits at min_context_length once something is evicted: room is made for
   min_context_length only (less eviction than for the configured context), and it is loaded
   with the largest context that fits into the room then free;
3. a model that cannot fit even at min_context_length in the most any one model may take is
   refused with `model_too_large`, naming both sizes.
A model that fits as configured is loaded as configured; a context is never below the floor.

The memory at a context: the KV cache grows linearly with the context (layers × kv heads ×
head dim × 2 × bytes per element, per token), so
- with two contexts measured (footprints learned across fitted loads and its configured one),
  the line through them;
- else its footprint at the configured context (or at the one measured context) less
  `kv_bytes_per_token` for each token of context given up. LM Studio's model list reports no
  layer or head counts, so the per-token cost is estimated from the file size
  (KV_BYTES_PER_TOKEN_PER_FILE_BYTE, below what common GQA models take): underestimating it
  shrinks the context more than needed, which is safe; measurement corrects it.
The memory never goes below the file's size (the weights stay).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..errors import ModelTooLarge, clip
from ..loadoptions import context_length as configured_option
from .context import EngineContext, Part
from .lifecycle import ModelEntry
from .memory import GB, MemorySample
from .registry import ECHO_MAX_CHARS

log = logging.getLogger("proxy.engine")
DEFAULT_CONTEXT_LENGTH = 4096     # LM Studio's context when a load names none
CONTEXT_STEP = 256                # contexts are chosen in these steps
# KV cache bytes per token of context, per byte of model file: Qwen3-4B takes 144 KiB per
# token for a 2.5 GB file, Llama-3-8B 128 KiB for 4.9 GB, Qwen3-32B 256 KiB for 20 GB.
KV_BYTES_PER_TOKEN_PER_FILE_BYTE = 24e-6
KV_BYTES_PER_TOKEN_BOUNDS = (16 * 1024, 256 * 1024)
KV_BYTES_PER_TOKEN_UNKNOWN = 64 * 1024


@dataclass(frozen=True)
class Choice:
    """Admission's plan for a model with fit: load it with `context_length`, which takes
    `need_bytes`; `settled` once the context is final (else it is chosen again once room
    has been made, see `settle`)."""
    context_length: int
    need_bytes: float
    settled: bool


class Fitter(Part):
    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)

    # -- facts -------------------------------------------------------------------------------
    def floor(self, e: ModelEntry) -> int | None:
        return self.registry.config.model(e.key).fit.min_context_length

    def configured_context(self, e: ModelEntry) -> int:
        """The context it is loaded with unless fitted: its load option, else the server's
        default (LM Studio's 4096, at most the model's maximum)."""
        configured = configured_option(self.registry.config.model(e.key).load)
        if configured is not None:
            return configured
        top = e.max_context_length
        return min(top, DEFAULT_CONTEXT_LENGTH) if top else DEFAULT_CONTEXT_LENGTH

    def kv_bytes_per_token(self, e: ModelEntry) -> float:
        measured = self._line(e)
        if measured is not None:
            return measured[1]
        if not e.size_bytes:
            return KV_BYTES_PER_TOKEN_UNKNOWN
        lo, hi = KV_BYTES_PER_TOKEN_BOUNDS
        return min(hi, max(lo, e.size_bytes * KV_BYTES_PER_TOKEN_PER_FILE_BYTE))

    def need_at(self, e: ModelEntry, context: int) -> float:
        """The memory e is expected to take when loaded with this context."""
        line = self._line(e)
        if line is not None:
            need = line[0] + line[1] * context
        else:
            at, bytes_at = self._anchor(e)
            need = bytes_at - self.kv_bytes_per_token(e) * (at - context)
        return max(need, float(e.size_bytes or 0))

    def _anchor(self, e: ModelEntry) -> tuple[int, float]:
        """One context whose memory is known best: the one measured (nearest the configured),
        else the configured one with the registry's footprint."""
        configured = self.configured_context(e)
        if e.context_footprints:
            at = min(e.context_footprints, key=lambda c: abs(c - configured))
            return at, e.context_footprints[at][0]
        return configured, self.registry.configured_options_bytes(e)

    def _line(self, e: ModelEntry) -> tuple[float, float] | None:
        """(bytes at context 0, bytes per token) through the measured contexts, if two."""
        points = {c: b for c, (b, _) in e.context_footprints.items()}
        configured = self.configured_context(e)
        if e.footprint_bytes is not None and configured not in points:
            points[configured] = e.footprint_bytes        # learned with its own options
        if len(points) < 2:
            return None
        n = len(points)
        mean_c = sum(points) / n
        mean_b = sum(points.values()) / n
        var = sum((c - mean_c) ** 2 for c in points)
        slope = max(0.0, sum((c - mean_c) * (b - mean_b) for c, b in points.items()) / var)
        return mean_b - slope * mean_c, slope

    # -- admission ---------------------------------------------------------------------------
    def plan(self, e: ModelEntry, sample: MemorySample) -> Choice | ModelTooLarge | None:
        """None: load it as configured. Else the context to load it with, or the refusal of
        a model that cannot fit even at its floor."""
        floor = self.floor(e)
        configured = self.configured_context(e)
        if floor is None or floor >= configured:
            return None
        headroom = self.monitor.headroom(sample)
        full = self.registry.configured_options_bytes(e)
        if full <= headroom:
            return None
        least = self.need_at(e, floor)
        ceiling = self.monitor.ceiling_bytes(sample)
        if least > ceiling:
            return self._too_large(e, floor, least, configured, full, ceiling, sample)
        best = self.largest_fitting(e, floor, configured, headroom)
        if best is not None:
            return Choice(best, self.need_at(e, best), settled=True)
        return Choice(floor, least, settled=False)

    def largest_fitting(self, e: ModelEntry, floor: int, configured: int,
                        room: float) -> int | None:
        """The largest context in [floor, configured) whose memory fits into room."""
        if self.need_at(e, floor) > room:
            return None
        lo, hi = floor, configured - 1          # need_at grows with the context: bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.need_at(e, mid) <= room:
                lo = mid
            else:
                hi = mid - 1
        stepped = lo - lo % CONTEXT_STEP
        return stepped if stepped >= floor else lo

    def settle(self, e: ModelEntry, choice: Choice | None, sample: MemorySample) -> None:
        """Admitted: fix the context e is loaded with (its need is charged from now on)."""
        if choice is None:
            return
        context = choice.context_length
        if not choice.settled:   # room was made for the floor: take what is free now
            room = self.monitor.headroom(sample)
            if self.registry.configured_options_bytes(e) <= room:
                return           # the eviction freed enough for its configured context
            context = self.largest_fitting(e, choice.context_length,
                                           self.configured_context(e), room) or context
        e.fit_context_length = context
        e.fit_bytes = self.need_at(e, context)
        log.info("%s is loaded with a context of %d instead of %d (about %.1f GB instead of "
                 "%.1f GB): models.%s.fit", e.key, context, self.configured_context(e),
                 e.fit_bytes / GB, self.registry.configured_options_bytes(e) / GB, e.key)

    def unsettle(self, e: ModelEntry) -> None:
        e.fit_context_length = e.fit_bytes = None

    # -- the load ----------------------------------------------------------------------------
    def load_options(self, e: ModelEntry, options: dict[str, Any]) -> dict[str, Any]:
        if e.fit_context_length is None:
            return options
        return {**options, "context_length": e.fit_context_length}

    def loaded(self, e: ModelEntry, options: dict[str, Any], told: int | None) -> None:
        """The load finished: its context is what the server said, else what was asked."""
        e.context_length = told or configured_option(options) or e.context_length

    def learned(self, e: ModelEntry, observed_bytes: float) -> bool:
        """A footprint was measured across a load: a fitted one is kept for its context
        (True); one with the configured options is the registry's (False)."""
        context = e.fit_context_length
        if context is None:
            return False
        mean, n = e.context_footprints.get(context, (0.0, 0))
        e.context_footprints[context] = (mean + (observed_bytes - mean) / (n + 1), n + 1)
        e.fit_bytes = observed_bytes
        return True

    def _too_large(self, e: ModelEntry, floor: int, least: float, configured: int,
                   full: float, ceiling: float, s: MemorySample) -> ModelTooLarge:
        limit = self.monitor.binding_limit(s)
        key = clip(e.key, ECHO_MAX_CHARS)
        return ModelTooLarge(
            f"'{key}' needs {least / GB:.1f} GB at its smallest context {floor} "
            f"(models.{key}.fit.min_context_length) and {full / GB:.1f} GB at its configured "
            f"context {configured}, more than the {ceiling / GB:.1f} GB any one model may take "
            f"of {s.total_bytes / GB:.1f} GB (set by {limit}). It can never be loaded here: "
            f"lower models.{key}.fit.min_context_length or change {limit}.")
