"""LM Studio's protocol: management through /api/v1 (0.4+), state through /api/v0, forwarding;
spoken through a transport (transport.py), which owns the HTTP client, its errors and the
circuit breaker.

It survives LM Studio's quirks: unknown routes answer 200 with an error body (so every response
is checked for its shape), loads take instance ids apart from model keys, and a load refused for
lack of memory is told apart from other failures so the engine can evict and retry.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from ..config import UpstreamConfig
from ..errors import ModelLoadFailed, UpstreamError
from .base import ApiLevel, Capabilities, LoadResult, UpstreamModel
from .http import HttpBackend, error_text as _error_text
from .identify import answered, mismatch, not_like

log = logging.getLogger("proxy.upstream")


_OOM_MARKERS = ("insufficient system resources", "out of memory", "not enough memory",
                "insufficient memory")


class LMStudioProtocol(HttpBackend):
    name = "LM Studio"
    kind = "lmstudio"

    def __init__(self, config: UpstreamConfig) -> None:
        super().__init__(config)
        self.level: ApiLevel | None = None

    @property
    def capabilities(self) -> Capabilities:
        """LM Studio loads by API from 0.4 (level MANAGED); before 0.3.6 (JIT_ONLY) it does
        not say what is loaded; it reports file sizes, not memory; it unloads by itself (a JIT
        model replaced by the next, TTLs); it runs several instances of a model, and has its
        own SDK protocol."""
        return Capabilities(manages_loading=self.level is ApiLevel.MANAGED,
                            reports_memory=False, self_evicts=True, multi_instance=True,
                            native_clients=True,
                            reports_residency=self.level is not ApiLevel.JIT_ONLY)

    # -- management --------------------------------------------------------------------------
    async def detect(self) -> ApiLevel:
        status, body = await self._call("GET", "/api/v1/models")
        if status == 200 and isinstance(body, dict) and isinstance(body.get("models"), list):
            self.level = ApiLevel.MANAGED
        else:
            status, body = await self._call("GET", "/api/v0/models")
            if status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
                self.level = ApiLevel.STATE_ONLY
            else:
                status, body = await self._call("GET", "/v1/models")
                if status == 401:
                    raise UpstreamError("LM Studio rejected the API token "
                                        "(set upstream.api_token)")
                if status != 200 or not isinstance(body, dict) or "data" not in body:
                    raise await not_like(
                        self._call, self.kind, self.base_url,
                        "GET /api/v1/models and /api/v0/models gave no model list, and "
                        f"/v1/models answered {answered(status, body, 'one')}")
                self.level = ApiLevel.JIT_ONLY
                # LM Studio before 0.4, or another server that speaks OpenAI's /v1 alone.
                self.kind_hint = await mismatch(self._call, self.kind, self.base_url, body)
                if self.kind_hint:
                    log.warning("%s", self.kind_hint)
        return self.level

    async def list_models(self) -> list[UpstreamModel]:
        level = self.level or await self.detect()
        if level is ApiLevel.MANAGED:
            _, body = await self._expect("GET", "/api/v1/models", "models")
            return [_from_v1(m) for m in body["models"] if isinstance(m, dict) and "key" in m]
        if level is ApiLevel.STATE_ONLY:
            _, body = await self._expect("GET", "/api/v0/models", "data")
            return [_from_v0(m) for m in body["data"] if isinstance(m, dict) and "id" in m]
        _, body = await self._expect("GET", "/v1/models", "data")
        return [UpstreamModel(key=m["id"]) for m in body["data"]
                if isinstance(m, dict) and "id" in m]

    async def load(self, key: str, options: Mapping[str, Any]) -> LoadResult:
        payload = {**options, "model": key}
        status, body = await self._call("POST", "/api/v1/models/load", payload,
                                        timeout_s=self.config.load_timeout_s)
        if status == 200 and isinstance(body, dict) and "instance_id" in body:
            echoed = body.get("load_config")
            return LoadResult(str(body["instance_id"]), body.get("load_time_seconds"),
                              _int(echoed.get("context_length")) if isinstance(echoed, dict)
                              else None)
        reason = _error_text(body) or f"HTTP {status}"
        exc = ModelLoadFailed(f"LM Studio could not load '{key}': {reason}")
        exc.out_of_memory = any(m in reason.lower() for m in _OOM_MARKERS)
        raise exc

    async def unload(self, instance_id: str) -> None:
        status, body = await self._call("POST", "/api/v1/models/unload",
                                        {"instance_id": instance_id})
        if status == 200 and isinstance(body, dict) and "instance_id" in body:
            return
        if status == 404:
            return  # already gone: someone else unloaded it, which is the state we wanted
        raise UpstreamError(f"LM Studio could not unload '{instance_id}': "
                            f"{_error_text(body) or f'HTTP {status}'}")

    async def _expect(self, method: str, path: str, list_key: str) -> tuple[int, dict]:
        status, body = await self._call(method, path)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get(list_key),
                                                                          list):
            raise UpstreamError(f"unexpected answer from {method} {path}: HTTP {status} "
                                f"{_error_text(body) or ''}".rstrip())
        return status, body


# The name the app, the library and the tests know it by.
LMStudioUpstream = LMStudioProtocol


def _from_v1(m: dict[str, Any]) -> UpstreamModel:
    loaded = [i for i in m.get("loaded_instances") or [] if isinstance(i, dict) and "id" in i]
    config = loaded[0].get("config") if loaded else None
    return UpstreamModel(key=m["key"], type="embedding" if m.get("type") == "embedding"
                         else "llm", size_bytes=m.get("size_bytes"),
                         instance_ids=tuple(str(i["id"]) for i in loaded),
                         max_context_length=m.get("max_context_length"),
                         context_length=_int(config.get("context_length"))
                         if isinstance(config, dict) else None,
                         extra={k: m[k] for k in ("publisher", "params_string", "format",
                                                  "architecture") if k in m})


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _from_v0(m: dict[str, Any]) -> UpstreamModel:
    state = m.get("state")
    return UpstreamModel(key=m["id"], type="embedding" if m.get("type") == "embeddings"
                         else "llm", instance_ids=(m["id"],) if state == "loaded" else (),
                         loading=state == "loading",
                         max_context_length=m.get("max_context_length"))
