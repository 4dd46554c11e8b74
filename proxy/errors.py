"""The proxy's own errors, each mapped to an OpenAI error envelope.

    ProxyError                      (500 internal_error)
    ├── InvalidRequest              (400 invalid_request_error)
    │   ├── BodyTooLarge            (413)
    │   ├── UnsupportedEncoding     (415 unsupported_content_encoding)
    │   ├── UnsupportedMediaType    (415 unsupported_media_type: an admin body that is not JSON)
    │   ├── HostNotAllowed          (421 host_not_allowed: a Host that is not the proxy's name)
    │   ├── RequestTimeout          (408 request_timeout: the body did not arrive in time)
    │   ├── ContextLengthExceeded   (400 context_length_exceeded: prompt above the context)
    │   └── ConfigRejected          (400 invalid_config: a reload found problems)
    ├── InvalidApiKey               (401 invalid_api_key, WWW-Authenticate)
    ├── PermissionDenied            (403)
    │   ├── AdminRequired           (403 admin_required)
    │   ├── OriginNotAllowed        (403 origin_not_allowed: a change asked by another site)
    │   └── ModelNotAllowed         (403 model_not_allowed)
    ├── RouteNotFound               (404)
    ├── ModelNotFound               (404 model_not_found)
    ├── InsufficientMemory          (503 insufficient_memory, Retry-After)
    │   └── ModelTooLarge           (503 model_too_large: can never fit; final)
    ├── GroupBusy                   (503 group_busy: a member of its exclusive group stays)
    ├── ModelLoadFailed             (503 model_load_failed)
    │   └── UpstreamBusy            (503 upstream_busy: the server's own queue is full)
    ├── ModelUnavailable            (409 model_unavailable: pinned, busy, external)
    ├── ShuttingDown                (503 shutting_down: the drain deadline passed)
    ├── StateUnavailable            (503 state_unavailable: the fleet's shared state, Redis)
    └── UpstreamError               (502 upstream_error)
        ├── UpstreamUnreachable     (502 upstream_unreachable)
        └── UpstreamTimeout         (504 upstream_timeout)

Errors that the upstream itself returns are relayed unchanged; these are only the ones the proxy
raises. `ConfigError` is separate: it never reaches a client.

A refusal that a retry cannot change is `final`: its response says `x-should-retry: false`, which
the OpenAI SDKs obey instead of retrying a 408/409/429/5xx (twice, by default). Final:
model_too_large; insufficient_memory for a model the server already refused at that size, or
when even all the memory that may go (evictable, serving, loading, other programs) would not
make room, so only a person freeing memory can help; group_busy for a member that is pinned
or not the proxy's; model_unavailable for a server that cannot load models on request.
"""
from __future__ import annotations

from typing import Any


class ProxyError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = "internal_error"
    final = False    # a retry gets the same answer (see the module's docstring)

    def __init__(self, message: str, *, param: str | None = None,
                 retry_after_s: float | None = None, final: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        if final is not None:
            self.final = final

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        out = {"x-should-retry": "false"} if self.final else {}
        if self.retry_after_s is not None:
            out["Retry-After"] = str(max(1, round(self.retry_after_s)))
        return out


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class UnsupportedEncoding(InvalidRequest):
    status = 415
    code = "unsupported_content_encoding"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class HostNotAllowed(InvalidRequest):
    """421 Misdirected Request: the name asked for is not one this server answers to (DNS
    rebinding sends the attacker's own name). Final: the same name gets the same answer."""
    status = 421
    code = "host_not_allowed"
    final = True


class RequestTimeout(InvalidRequest):
    status = 408
    code = "request_timeout"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ConfigRejected(InvalidRequest):
    code = "invalid_config"


class InvalidApiKey(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="lmstudio-proxy"'}


class PermissionDenied(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class AdminRequired(PermissionDenied):
    code = "admin_required"


class OriginNotAllowed(PermissionDenied):
    code = "origin_not_allowed"
    final = True


class ModelNotAllowed(PermissionDenied):
    code = "model_not_allowed"


class ShuttingDown(ProxyError):
    status = 503
    type = "server_error"
    code = "shutting_down"


class StateUnavailable(ProxyError):
    """The shared state store (Redis) cannot be reached; the message names it by its
    redacted URL. Whatever needed it (a load, an eviction) can be retried shortly."""
    status = 503
    type = "server_error"
    code = "state_unavailable"


class RouteNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    final = True

    def __init__(self, message: str, allowed: list[str]) -> None:
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Allow": ", ".join(self.allowed)}


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class InsufficientMemory(ProxyError):
    status = 503
    type = "server_error"
    code = "insufficient_memory"


class ModelTooLarge(InsufficientMemory):
    code = "model_too_large"
    final = True


class GroupBusy(ProxyError):
    """Another member of the model's exclusive group is resident and does not go (serving
    past the deadline: Retry-After; pinned or not the proxy's: none)."""
    status = 503
    type = "server_error"
    code = "group_busy"


class ModelLoadFailed(ProxyError):
    status = 503
    type = "server_error"
    code = "model_load_failed"
    out_of_memory = False  # the server refused for lack of memory: evicting may help


class UpstreamBusy(ModelLoadFailed):
    """A load the server turned away because its own request queue is full (Ollama's
    OLLAMA_MAX_QUEUE): not a lack of memory, and nothing to evict for."""
    code = "upstream_busy"


class ModelUnavailable(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "model_unavailable"


class UpstreamError(ProxyError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ConfigError(Exception):
    """Every problem found in a configuration, each naming its path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


CLIP_CHARS = 200


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """A client's string fit for a log line or an error message: control characters escaped
    (a newline cannot forge a log line), at most `limit` characters kept."""
    cut = text[:limit]
    if not cut.isprintable():
        cut = cut.encode("unicode_escape").decode("ascii")[:limit]
    return cut + "…" if len(text) > limit else cut
