"""Any OpenAI-compatible server (vLLM, SGLang, a remote service, another proxy): relay and
measure only. Models come from /v1/models; the server decides what is resident, so the proxy
neither loads nor unloads, and keys, statistics, limits and the dashboard are what it adds.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from ..errors import ModelLoadFailed, UpstreamError
from .base import ApiLevel, Capabilities, LoadResult, UpstreamModel
from .http import HttpBackend
from .identify import answered, mismatch, not_like

log = logging.getLogger("proxy.upstream")

CAPABILITIES = Capabilities(manages_loading=False, reports_memory=False, self_evicts=False,
                            multi_instance=False, native_clients=False,
                            reports_residency=False)


class OpenAIProtocol(HttpBackend):
    name = "the OpenAI-compatible server"
    kind = "openai"
    capabilities = CAPABILITIES

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.level: ApiLevel | None = None
        self._listed: Any = None     # the last /v1/models answer

    async def detect(self) -> ApiLevel:
        await self._catalogue()
        self.level = ApiLevel.JIT_ONLY   # the server serves whatever it has; nothing to manage
        # A server the proxy could manage (llama.cpp's router, Ollama) is worth
        # a word: kind openai was perhaps not chosen knowingly.
        self.kind_hint = await mismatch(self._call, self.kind, self.base_url, self._listed)
        if self.kind_hint:
            log.warning("%s", self.kind_hint)
        return self.level

    async def list_models(self) -> list[UpstreamModel]:
        if self.level is None:
            self.level = ApiLevel.JIT_ONLY
        return [UpstreamModel(key=m["id"], max_context_length=_context(m),
                              extra={"owned_by": m["owned_by"]} if "owned_by" in m else {})
                for m in await self._catalogue()]

    async def load(self, key: str, options: Mapping[str, Any]) -> LoadResult:
        raise ModelLoadFailed(f"'{key}' cannot be loaded through the proxy: an OpenAI-"
                              f"compatible upstream serves the models it has (upstream.kind: "
                              f"openai relays only).")

    async def unload(self, instance_id: str) -> None:
        raise UpstreamError(f"'{instance_id}' cannot be unloaded through the proxy: an "
                            f"OpenAI-compatible upstream decides what it keeps loaded.")

    async def _catalogue(self) -> list[dict[str, Any]]:
        status, body = await self._call("GET", "/v1/models")
        if status == 401:
            raise UpstreamError("the upstream rejected the API token (set upstream.api_token)")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"),
                                                                          list):
            got = answered(status, body, "a model list")
            raise await not_like(self._call, self.kind, self.base_url,
                                 f"GET /v1/models answered {got}")
        self._listed = body
        return [m for m in body["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]


def _context(m: dict[str, Any]) -> int | None:
    value = m.get("max_model_len")   # vLLM's name for the context length it serves
    return value if isinstance(value, int) and not isinstance(value, bool) else None
