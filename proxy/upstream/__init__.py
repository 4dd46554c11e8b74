"""Model servers behind one seam. `create_upstream(config)` builds the configured adapter."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (ApiLevel, Capabilities, LoadResult, ModelBackend, Upstream, UpstreamModel,
                   UpstreamResponse)

if TYPE_CHECKING:
    from ..config import UpstreamConfig

__all__ = ["ApiLevel", "Capabilities", "LoadResult", "ModelBackend", "Upstream",
           "UpstreamModel", "UpstreamResponse", "create_upstream"]


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
