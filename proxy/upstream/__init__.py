"""Model servers behind one seam. `create_upstream(config)` builds the configured adapter;
`no_loading(kind)` says what a server of that kind lacks when the proxy cannot load on it."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (ApiLevel, Capabilities, LoadResult, ModelBackend, Upstream, UpstreamModel,
                   UpstreamResponse)

if TYPE_CHECKING:
    from ..config import UpstreamConfig

__all__ = ["ApiLevel", "Capabilities", "LoadResult", "ModelBackend", "Upstream",
           "UpstreamModel", "UpstreamResponse", "create_upstream", "no_loading"]

# Why a server of each kind has no load/unload API, and who loads its models then (/readyz's
# note, and the refusal of a load or unload asked for by hand).
_NO_LOADING = {
    "lmstudio": ("LM Studio older than 0.4.0 has no load/unload API",
                 "loading is left to its own JIT"),
    "llamacpp": ("llama-server not in router mode has no load/unload API",
                 "it serves the model it was started with"),
    "openai": ("an OpenAI-compatible server (upstream.kind: openai) has no load/unload API",
               "it decides itself what is loaded"),
}


def no_loading(kind: str) -> tuple[str, str]:
    """(what a server of this kind lacks, who loads its models instead)."""
    return _NO_LOADING.get(kind, (f"the {kind} upstream has no load/unload API",
                                  "it decides itself what is loaded"))


def create_upstream(config: "UpstreamConfig") -> Upstream:
    if config.kind == "lmstudio":
        from .lmstudio import LMStudioProtocol
        return LMStudioProtocol(config)
    if config.kind == "llamacpp":
        from .llamacpp import LlamaCppProtocol
        return LlamaCppProtocol(config)
    if config.kind == "ollama":
        from .ollama import OllamaProtocol
        return OllamaProtocol(config)
    if config.kind == "openai":
        from .openai import OpenAIProtocol
        return OpenAIProtocol(config)
    raise ValueError(f"unknown upstream kind {config.kind!r}")
