"""`models.<key>.load` and `models.<key>.fit` checked against what the configured backends take
(called by configload.load_config's cross-checks, so at `--check` and at every reload).

LM Studio's load call (`POST /api/v1/models/load`) rejects a key it does not know with a 400,
so with an LM Studio upstream every key must be one of LM_STUDIO_OPTIONS with its type. Ollama
takes its own model options (`num_ctx`, `num_gpu`, ...) and `context_length` (sent as
`num_ctx`); llama.cpp's router and an OpenAI-compatible server take none: options given only
to such servers are a warning, not an error, since a fleet may mix kinds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .config import Config

# LM Studio's load options and their types (its REST API, 0.4+).
LM_STUDIO_OPTIONS: dict[str, type] = {
    "context_length": int, "eval_batch_size": int, "num_experts": int,
    "flash_attention": bool, "offload_kv_cache_to_gpu": bool}
# The backends (upstream kinds) that pass load options on, and those that size a context.
TAKES_OPTIONS = frozenset({"lmstudio", "ollama"})
SIZES_CONTEXT = frozenset({"lmstudio", "ollama"})


def kinds(config: "Config") -> frozenset[str]:
    """The kinds of server the models may be loaded on."""
    if config.upstreams:
        return frozenset(h.kind for h in config.upstreams)
    return frozenset({config.upstream.kind})


def context_length(options: Mapping[str, Any]) -> int | None:
    value = options.get("context_length")
    return value if _is_int(value) else None


def load_option_problems(config: "Config") -> list[str]:
    problems: list[str] = []
    lmstudio = "lmstudio" in kinds(config)
    for key, m in config.models.items():
        path = f"models.{key}.load"
        for name, value in m.load.items():
            expected = LM_STUDIO_OPTIONS.get(name)
            if expected is None:
                if lmstudio:
                    problems.append(f"{path}.{name}: not an option of LM Studio's load call "
                                    f"(known: {', '.join(sorted(LM_STUDIO_OPTIONS))}); LM "
                                    f"Studio refuses a load with an unknown key")
                continue
            if expected is bool and not isinstance(value, bool):
                problems.append(f"{path}.{name}: must be true or false (got {value!r})")
            elif expected is int and not (_is_int(value) and value >= 1):
                problems.append(f"{path}.{name}: must be a whole number ≥ 1 (got {value!r})")
        floor = m.fit.min_context_length
        configured = context_length(m.load)
        if floor is not None and configured is not None and floor > configured:
            problems.append(f"models.{key}.fit.min_context_length: {floor} is above the "
                            f"context it is loaded with ({path}.context_length: {configured});"
                            f" it could only grow, never shrink")
    return problems


def load_option_warnings(config: "Config") -> list[str]:
    """Options no configured server will use."""
    present = kinds(config)
    out = []
    for key, m in config.models.items():
        if m.load and not present & TAKES_OPTIONS:
            out.append(f"models.{key}.load: has no effect: {', '.join(sorted(present))} "
                       f"take no load options (LM Studio and Ollama do)")
        if m.fit.min_context_length is not None and not present & SIZES_CONTEXT:
            out.append(f"models.{key}.fit: has no effect: {', '.join(sorted(present))} "
                       f"cannot be told a context length (LM Studio and Ollama can)")
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
