"""Ollama's protocol: the catalogue from /api/tags, what is resident (and how many bytes it
holds) from /api/ps, loads and unloads through keep_alive, OpenAI-compatible traffic to /v1.

Ollama has no load call: an empty generate loads a model and `keep_alive` says for how long.
The proxy loads with `keep_alive: -1` (never expire), so the only evictions Ollama makes on its
own are past OLLAMA_MAX_LOADED_MODELS or for a client that asks natively with a keep_alive of
its own; both show in /api/ps, which is why this backend declares `self_evicts`. Unloading is
an empty generate with `keep_alive: 0`. An embedding model refuses generate, so it is loaded by
an embed with no input.

Names: Ollama lists `llama3.2:latest` everywhere (/api/tags, /api/ps, /v1/models) and answers
to `llama3.2` as well. The full name is the model's key and its one instance; the short form
is an alias the engine resolves.

Ollama's own queue (OLLAMA_MAX_QUEUE) answers 503 when full. A forwarded request relays that
answer as it is; a load turned away that way is `UpstreamBusy`, not a lack of memory.
"""
from __future__ import annotations

import asyncio
from typing import Any, Mapping

from ..errors import ModelLoadFailed, UpstreamBusy, UpstreamError
from .base import ApiLevel, Capabilities, LoadResult, UpstreamModel
from .http import HttpBackend, error_text
from .identify import answered, not_like

CAPABILITIES = Capabilities(manages_loading=True, reports_memory=True, self_evicts=True,
                            multi_instance=False, native_clients=False)
KEEP_FOREVER = -1      # keep_alive for the proxy's own loads: Ollama never expires them
_OOM_MARKERS = ("requires more system memory", "out of memory", "not enough memory",
                "insufficient memory", "unable to allocate")
_NO_GENERATE = "does not support generate"
_EMBEDDING_FAMILIES = {"bert", "nomic-bert", "xlm-roberta", "jina-bert-v2", "new"}
_NANOSECONDS = 1e9


class OllamaProtocol(HttpBackend):
    name = "Ollama"
    kind = "ollama"
    capabilities = CAPABILITIES

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.level: ApiLevel | None = None
        self.version: str | None = None
        self._embedding: set[str] = set()   # full names that refused generate: loaded by embed

    # -- management --------------------------------------------------------------------------
    async def detect(self) -> ApiLevel:
        status, body = await self._call("GET", "/api/version")
        if status == 401:
            raise UpstreamError("Ollama rejected the API token (set upstream.api_token)")
        if status != 200 or not isinstance(body, dict) or "version" not in body:
            raise await not_like(self._call, self.kind, self.base_url,
                                 f"GET /api/version answered {answered(status, body, 'a version')}")
        self.version = str(body["version"])
        self.level = ApiLevel.MANAGED
        return self.level

    async def list_models(self) -> list[UpstreamModel]:
        if self.level is None:
            await self.detect()
        tags, running = await asyncio.gather(self._models("/api/tags"),
                                             self._models("/api/ps"))
        resident = {full_name(m["name"]): m for m in running}
        out = [self._model(m, resident.pop(full_name(m["name"]), None)) for m in tags]
        # Resident but no longer listed (deleted while loaded): still holds memory.
        out += [self._model(m, m) for m in resident.values()]
        return out

    async def load(self, key: str, options: Mapping[str, Any]) -> LoadResult:
        payload: dict[str, Any] = {"model": key, "keep_alive": KEEP_FOREVER}
        if options:
            # num_ctx, num_gpu, ...: Ollama's own names; LM Studio's context_length is num_ctx.
            own = {k: v for k, v in options.items() if k != "context_length"}
            if "context_length" in options:
                own["num_ctx"] = options["context_length"]
            payload["options"] = own
        timeout_s = self.config.load_timeout_s
        name = full_name(key)
        path = "/api/embed" if name in self._embedding else "/api/generate"
        status, body = await self._call("POST", path, payload, timeout_s=timeout_s)
        if status == 400 and _NO_GENERATE in (error_text(body) or ""):
            self._embedding.add(name)
            path = "/api/embed"
            status, body = await self._call("POST", path, payload, timeout_s=timeout_s)
        if status == 200 and isinstance(body, dict):
            duration = body.get("load_duration")
            return LoadResult(name, duration / _NANOSECONDS
                              if isinstance(duration, (int, float)) and duration else None)
        reason = error_text(body) or f"HTTP {status}"
        if status == 503:
            raise UpstreamBusy(f"Ollama's request queue is full, so '{key}' could not be "
                               f"loaded now ({reason}); raise OLLAMA_MAX_QUEUE or retry "
                               f"later.", retry_after_s=1.0)
        exc = ModelLoadFailed(f"Ollama could not load '{key}': {reason}")
        exc.out_of_memory = any(m in reason.lower() for m in _OOM_MARKERS)
        raise exc

    async def unload(self, instance_id: str) -> None:
        # keep_alive 0 expires the runner before Ollama looks at what the model can do, so
        # this works for embedding models too.
        status, body = await self._call("POST", "/api/generate",
                                        {"model": instance_id, "keep_alive": 0})
        if status in (200, 404):   # 404: gone from the machine, which unloads it as well
            return
        raise UpstreamError(f"Ollama could not unload '{instance_id}': "
                            f"{error_text(body) or f'HTTP {status}'}")

    async def _models(self, path: str) -> list[dict[str, Any]]:
        status, body = await self._call("GET", path)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("models"),
                                                                          list):
            raise UpstreamError(f"unexpected answer from GET {path}: HTTP {status} "
                                f"{error_text(body) or ''}".rstrip())
        out = []
        for m in body["models"]:
            name = m.get("name") or m.get("model") if isinstance(m, dict) else None
            if isinstance(name, str):
                out.append({**m, "name": name})
        return out

    def _model(self, tag: dict[str, Any], ps: dict[str, Any] | None) -> UpstreamModel:
        key = full_name(tag["name"])
        details = tag.get("details") if isinstance(tag.get("details"), dict) else {}
        families = set(details.get("families") or ()) | {details.get("family")}
        caps = tag.get("capabilities")
        embedding = key in self._embedding or (
            "embedding" in caps if isinstance(caps, list) else bool(
                families & _EMBEDDING_FAMILIES))
        extra = {k: details[k] for k in ("family", "parameter_size", "quantization_level")
                 if details.get(k)}
        memory, resident = None, {}
        if ps is not None:
            memory = _int(ps.get("size"))
            # How much of it is on the GPU, and when Ollama would expire it (shown in the
            # model's row while it is loaded).
            resident = {k: ps[k] for k in ("size_vram", "expires_at", "context_length")
                        if k in ps}
        return UpstreamModel(key=key, type="embedding" if embedding else "llm",
                             size_bytes=_int(tag.get("size")) if ps is not tag else None,
                             memory_bytes=memory,
                             instance_ids=(key,) if ps is not None else (),
                             context_length=_int(ps.get("context_length"))
                             if ps is not None else None,
                             aliases=(short_name(key),) if short_name(key) != key else (),
                             extra=extra, resident=resident)


def short_name(name: str) -> str:
    """`llama3.2:latest` → `llama3.2`: the form users write; other tags are kept."""
    return name[:-len(":latest")] if name.endswith(":latest") else name


def full_name(name: str) -> str:
    """`llama3.2` → `llama3.2:latest`, as /api/ps names it (the tag follows the last '/')."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None
