"""Which kind of server answers, when it is not the configured one: a `kind` left at its
default (lmstudio) in front of llama.cpp's router, or `kind: llamacpp` pointed at Ollama, would
otherwise look healthy but never load, or fail with a message that names only what was
expected. Asked at detect time only (a few GETs), never per request.

Each server has a mark no other has: llama-server lists its models `owned_by: "llamacpp"`
(a router's with a `status` each), Ollama answers GET /api/version with its version, and LM
Studio 0.4+ lists its models at /api/v1/models under `models` (0.3 at /api/v0/models).
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from ..errors import UpstreamError, clip
from .http import error_text

Call = Callable[[str, str], Awaitable[tuple[int, Any]]]   # HttpBackend._call(method, path)

NAMES = {"lmstudio": "LM Studio", "llamacpp": "llama.cpp's llama-server", "ollama": "Ollama"}


def answered(status: int, body: Any, wanted: str) -> str:
    """What a GET answered, for a message: `404 (File Not Found)`, or `200 without <wanted>
    (Unexpected endpoint or method)` — a 200 that is not the answer looked for says so."""
    text = error_text(body)
    said = f" ({clip(text, 120)})" if text else ""   # the server's words, one line
    return f"200 without {wanted}{said}" if status == 200 else f"{status}{said}"


def llama_mark(body: Any) -> tuple[bool, bool]:
    """(a model list of llama-server's, a router's) in a GET /models or /v1/models answer."""
    data = body.get("data") if isinstance(body, dict) else None
    entries = [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []
    router = any(isinstance(m.get("status"), dict) for m in entries)
    return router or any(m.get("owned_by") == "llamacpp" for m in entries), router


async def identify(call: Call, kind: str, models: Any = None,
                   among: tuple[str, ...] = tuple(NAMES)) -> tuple[str, str] | None:
    """(the kind of server that answers, the evidence) when it is another of `among` than
    `kind`, else None. `models` is a /v1/models answer already in hand (saves asking)."""
    among = tuple(k for k in among if k != kind)
    try:
        if "llamacpp" in among:
            if models is None:
                _, models = await call("GET", "/v1/models")
            if llama_mark(models)[0]:
                return "llamacpp", "its model list says owned_by llamacpp"
        if "ollama" in among:
            status, body = await call("GET", "/api/version")
            if status == 200 and isinstance(body, dict) and isinstance(body.get("version"), str):
                return "ollama", f"GET /api/version answered version {body['version'][:40]}"
        if "lmstudio" in among:
            status, body = await call("GET", "/api/v1/models")
            if status == 200 and isinstance(body, dict) and isinstance(body.get("models"), list):
                return "lmstudio", "GET /api/v1/models answered LM Studio's model list"
    except UpstreamError:
        return None      # it answered the detection, not this: no claim either way
    return None


def _set_kind(found: tuple[str, str]) -> str:
    other, evidence = found
    return f"it looks like {NAMES[other]} ({evidence}): set kind: {other} for it " \
           "(upstream.kind, or the host's under upstreams:)"


async def not_like(call: Call, kind: str, url: str, what: str,
                   models: Any = None) -> UpstreamError:
    """The error for a server that does not answer as one of `kind` does: what it answered
    (`what`), then what it looks like instead, or else what to check."""
    found = await identify(call, kind, models)
    advice = _set_kind(found) if found is not None else \
        "check upstream.url (the server's address, without /v1) and upstream.kind"
    expected = NAMES.get(kind, "an OpenAI-compatible server")
    return UpstreamError(f"{url} does not look like {expected}: {what}; {advice}")


async def mismatch(call: Call, kind: str, url: str, models: Any) -> str | None:
    """For a server that answered well enough to relay to (lmstudio's or openai's /v1 alone):
    a note that it is another kind the proxy could manage, else None. As kind openai, a
    single-model llama-server is relayed alike as by kind llamacpp (nothing to say), and LM
    Studio may well be chosen to be relayed to only (the demo's openai flavour is)."""
    found = await identify(call, kind, models,
                           among=("llamacpp", "ollama") if kind == "openai" else tuple(NAMES))
    if found is None or (kind == "openai" and found[0] == "llamacpp"
                         and not llama_mark(models)[1]):
        return None
    expected = NAMES.get(kind, "a plain OpenAI-compatible server")
    return f"{url} is not {expected}: {_set_kind(found)}"
