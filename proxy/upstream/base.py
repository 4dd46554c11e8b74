"""The seam between the engine and a model server.

`ModelBackend` is all the engine needs (discover, load, unload); `Upstream` adds forwarding for
the HTTP handlers. Tests and the eviction benchmark implement `ModelBackend` in a few lines;
later backends (Ollama, llama.cpp's router, vLLM) implement `Upstream`.

An adapter is a backend's protocol (lmstudio.py) spoken through a `Transport` (transport.py).
Nothing of the HTTP client crosses this seam: a forwarded response is an `UpstreamResponse`,
and every transport failure — connecting, waiting, or reading a body half-way — arrives as one
of the project's `UpstreamError`s, mapped by the transport in one place.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, AsyncContextManager, AsyncIterable, AsyncIterator, Mapping, Protocol


class ApiLevel(str, enum.Enum):
    MANAGED = "managed"        # load/unload over HTTP (LM Studio 0.4+ /api/v1)
    STATE_ONLY = "state-only"  # sees what is loaded but cannot load (LM Studio 0.3.6+ /api/v0)
    JIT_ONLY = "jit-only"      # OpenAI surface only; the server loads on demand by itself

    @property
    def can_manage(self) -> bool:
        return self is ApiLevel.MANAGED


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do and tell; the engine branches on these, never on a backend's name."""
    manages_loading: bool    # loads and unloads on request
    reports_memory: bool     # real resident bytes per model (else file size only)
    self_evicts: bool        # may unload models on its own (LRU past a count, keep-alive expiry)
    multi_instance: bool     # can hold several instances of one model
    native_clients: bool     # has a native (non-OpenAI) client protocol worth relaying
    # tells which models are loaded (an OpenAI-compatible server and LM Studio before 0.3.6
    # list models only: their residency is unknown, not "unloaded")
    reports_residency: bool = True


def capabilities_of(backend: object, level: ApiLevel) -> Capabilities:
    """A backend's declared capabilities (read after `detect()`); a `ModelBackend` written
    before they existed is taken to manage loading at API level MANAGED and nothing more."""
    declared = getattr(backend, "capabilities", None)
    if isinstance(declared, Capabilities):
        return declared
    return Capabilities(manages_loading=level.can_manage, reports_memory=False,
                        self_evicts=False, multi_instance=False, native_clients=False)


@dataclass(frozen=True)
class UpstreamModel:
    key: str
    type: str = "llm"                          # llm | embedding
    size_bytes: int | None = None              # file size on disk
    memory_bytes: int | None = None            # resident bytes the server reports (if it can)
    instance_ids: tuple[str, ...] = ()         # loaded instances (empty: not loaded)
    loading: bool = False
    max_context_length: int | None = None
    context_length: int | None = None          # the context its loaded instance has, if told
    extra: Mapping[str, Any] = field(default_factory=dict)   # what else the server says of it
    aliases: tuple[str, ...] = ()              # other names the server answers to for it
    resident: Mapping[str, Any] = field(default_factory=dict)  # ... and of its loaded instance

    @property
    def loaded(self) -> bool:
        return bool(self.instance_ids)


@dataclass(frozen=True)
class LoadResult:
    instance_id: str
    load_time_s: float | None = None
    context_length: int | None = None   # the context it was loaded with, if the server said


class ModelBackend(Protocol):
    capabilities: Capabilities     # what it can do and tell; valid after detect()

    async def detect(self) -> ApiLevel: ...
    async def list_models(self) -> list[UpstreamModel]: ...
    async def load(self, key: str, options: Mapping[str, Any]) -> LoadResult: ...
    async def unload(self, instance_id: str) -> None: ...


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]   # case-insensitive; items() may repeat a name

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, one read at a time (nothing is held back)."""
        ...


class Upstream(ModelBackend, Protocol):
    base_url: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def request(self, method: str, path: str, headers: dict[str, str],
                body: bytes | AsyncIterable[bytes] | None
                ) -> AsyncContextManager[UpstreamResponse]:
        """Forward a request; `headers` is the caller's to give away (it may be amended), the
        end-to-end ones only (the adapter frames the body). An async iterable body is sent
        chunked as it comes. Leaving the block early drops the upstream connection."""
        ...
