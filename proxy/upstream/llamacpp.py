"""llama.cpp's `llama-server` in router mode (`kind: llamacpp`), over HTTP (http.py).

The router lists its models at `GET /models` with a status each (`unloaded`, `loading`,
`loaded`, `sleeping`; `failed: true` with the child's `exit_code` after a load that died).
`POST /models/load {"model"}` answers at once and the model becomes `loaded` later, so a load
here polls the list until it is, within `upstream.load_timeout_s`; `POST /models/unload` is
followed the same way until the model's process is gone. Each loaded model is a child
`llama-server` process: on the router's host its RSS is the model's memory (reports_memory),
elsewhere the engine falls back to the weights' size × footprint_factor.

The router evicts by itself beyond `--models-max` (default 4) and loads on demand unless told
not to; run it with `--models-max 0 --no-models-autoload` so that the proxy alone decides. A
single-model `llama-server` (no router) is relayed to and measured, never loaded.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Mapping

from ..config import UpstreamConfig
from ..urls import is_local_url
from ..errors import ModelLoadFailed, UpstreamError, UpstreamTimeout
from .base import ApiLevel, Capabilities, LoadResult, UpstreamModel
from .http import HttpBackend, error_text
from .identify import answered, not_like
from .llamacpp_procs import ChildSpec, child_spec, resident_bytes

log = logging.getLogger("proxy.upstream")
RESIDENT = ("loaded", "sleeping")     # a sleeping model wakes on its next request by itself
PENDING = ("loading", "downloading")
POLL_FIRST_S, POLL_MAX_S = 0.02, 0.25
UNLOAD_TIMEOUT_S = 60.0


class LlamaCppProtocol(HttpBackend):
    name = "llama.cpp"
    kind = "llamacpp"

    def __init__(self, config: UpstreamConfig) -> None:
        super().__init__(config)
        self.level: ApiLevel | None = None
        self.local = is_local_url(self.base_url)   # psutil sees the model processes
        self._sizes: dict[str, int] = {}     # weight bytes, once seen (meta.size or the file)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(manages_loading=self.level is ApiLevel.MANAGED,
                            reports_memory=self.local, self_evicts=True,
                            multi_instance=False, native_clients=False)

    # -- management --------------------------------------------------------------------------
    async def detect(self) -> ApiLevel:
        status, body = await self._call("GET", "/models")
        if status == 401:
            raise UpstreamError("llama-server rejected the API key (set upstream.api_token)")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"),
                                                                          list):
            raise await not_like(self._call, self.kind, self.base_url,
                                 f"GET /models answered {answered(status, body, 'a model list')}")
        router = any(isinstance(m, dict) and isinstance(m.get("status"), dict)
                     for m in body["data"])
        self.level = ApiLevel.MANAGED if router else ApiLevel.JIT_ONLY
        if router:
            await self._check_settings()
        else:
            log.warning("%s is a single-model llama-server, not a router: requests are "
                        "relayed, nothing is loaded or unloaded", self.base_url)
        return self.level

    async def _check_settings(self) -> None:
        """Say so when the router would evict or load by itself (it is not an error)."""
        status, props = await self._call("GET", "/props")
        if status != 200 or not isinstance(props, dict):
            return
        if props.get("max_instances") not in (0, None) or props.get("models_autoload"):
            log.warning("llama-server at %s evicts beyond %s models and autoloads=%s; run it "
                        "with --models-max 0 --no-models-autoload so that the proxy decides",
                        self.base_url, props.get("max_instances"), props.get("models_autoload"))

    async def list_models(self) -> list[UpstreamModel]:
        if self.level is None:
            await self.detect()
        entries = await self._entries()
        specs: dict[str, ChildSpec] = {}
        for m in entries:
            args = _status(m).get("args") or []
            if self.local and _status(m).get("value") in RESIDENT and isinstance(args, list):
                spec = child_spec([str(a) for a in args])
                if spec is not None:
                    specs[m["id"]] = spec
            self._remember_size(m)
        rss = await asyncio.to_thread(resident_bytes, specs) if specs else {}
        return [self._model(m, rss.get(m["id"])) for m in entries]

    async def load(self, key: str, options: Mapping[str, Any]) -> LoadResult:
        """Load and wait until the router reports it loaded; options are the router's own
        business (its preset), so none are sent."""
        started_s = time.monotonic()
        status, body = await self._call("POST", "/models/load", {"model": key})
        reason = error_text(body) or f"HTTP {status}"
        if status == 404:
            raise ModelLoadFailed(f"llama.cpp could not load '{key}': the router does not "
                                  f"know it ({reason})")
        if status != 200 and "already running" not in reason:
            raise ModelLoadFailed(f"llama.cpp could not load '{key}': {reason}")
        m = await self._await_status(key, lambda s: s.get("value") not in PENDING,
                                     self.config.load_timeout_s, "load")
        state = _status(m)
        if state.get("value") in RESIDENT:
            return LoadResult(key, time.monotonic() - started_s)
        if state.get("failed"):
            raise ModelLoadFailed(f"llama.cpp could not load '{key}': its process exited with "
                                  f"code {state.get('exit_code')}")
        raise ModelLoadFailed(f"llama.cpp could not load '{key}': it went back to "
                              f"'{state.get('value')}' while loading")

    async def unload(self, instance_id: str) -> None:
        status, body = await self._call("POST", "/models/unload", {"model": instance_id})
        reason = error_text(body) or f"HTTP {status}"
        if status == 404 or (status == 400 and ("not running" in reason
                                                 or "not found" in reason)):
            return   # already gone: the state we wanted
        if status != 200:
            raise UpstreamError(f"llama.cpp could not unload '{instance_id}': {reason}")
        await self._await_status(instance_id,
                                 lambda s: s.get("value") not in RESIDENT + PENDING,
                                 UNLOAD_TIMEOUT_S, "unload")

    async def _await_status(self, key: str, done: Any, timeout_s: float, what: str
                            ) -> dict[str, Any]:
        """Poll `GET /models` until key's status satisfies done (the router answers a load
        or an unload before it happens)."""
        deadline_s = time.monotonic() + timeout_s
        pause_s = POLL_FIRST_S
        while True:
            m = next((m for m in await self._entries() if m["id"] == key), None)
            if m is None:
                raise ModelLoadFailed(f"llama.cpp no longer lists '{key}'")
            if done(_status(m)):
                return m
            if time.monotonic() >= deadline_s:
                raise UpstreamTimeout(f"llama.cpp did not finish the {what} of '{key}' within "
                                      f"{timeout_s:g}s (still {_status(m).get('value')})")
            await asyncio.sleep(pause_s)
            pause_s = min(POLL_MAX_S, pause_s * 2)

    async def _entries(self) -> list[dict[str, Any]]:
        status, body = await self._call("GET", "/models")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"),
                                                                          list):
            raise UpstreamError(f"unexpected answer from GET /models: HTTP {status} "
                                f"{error_text(body) or ''}".rstrip())
        return [m for m in body["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def _remember_size(self, m: dict[str, Any]) -> None:
        meta = m.get("meta")
        if isinstance(meta, dict) and isinstance(meta.get("size"), int):
            self._sizes[m["id"]] = meta["size"]
        elif self.local and m["id"] not in self._sizes:
            args = _status(m).get("args")
            spec = child_spec([str(a) for a in args]) if isinstance(args, list) else None
            if spec is not None:
                try:
                    self._sizes[m["id"]] = os.path.getsize(spec.model_path)
                except OSError:
                    pass

    def _model(self, m: dict[str, Any], rss_bytes: int | None) -> UpstreamModel:
        state = _status(m)
        value = state.get("value")
        args = [str(a) for a in state.get("args") or []]
        meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
        extra: dict[str, Any] = {"status": value}
        if state.get("failed"):
            extra["exit_code"] = state.get("exit_code")
        embedding = any(a in ("--embedding", "--embeddings") for a in args)
        return UpstreamModel(
            key=m["id"], type="embedding" if embedding else "llm",
            size_bytes=self._sizes.get(m["id"]),
            memory_bytes=rss_bytes,
            instance_ids=(m["id"],) if value in RESIDENT or "status" not in m else (),
            loading=value == "loading", max_context_length=meta.get("n_ctx_train"),
            extra=extra)


def _status(m: Mapping[str, Any]) -> dict[str, Any]:
    s = m.get("status")
    return s if isinstance(s, dict) else {}

