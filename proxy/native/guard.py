"""Who may do what on LM Studio's native protocol: the proxy's keys, checked as the SDKs send them.

    the handshake     the key comes as the first frame's `clientPasskey` (the SDKs' own field:
                      `new LMStudioClient({clientPasskey})` in JavaScript) or as
                      `Authorization: Bearer` on the upgrade (checked by auth.authenticate);
                      with client keys configured a connection without one is refused.
                      `/plugins`, `/runtime` and `/diagnostics` need the admin token.
    each frame        a model named by a load, prediction, embedding or any call with a
                      model specifier must be one the key allows (`ClientKey.allows`);
                      unloading a model the key did not load, and the calls that change the
                      host (`KEY_ENDPOINTS` lists what a key may call in /system and
                      /repository), need the admin token.

An accepted proxy key never reaches LM Studio: the frame it gets carries `upstream.api_token`
(LM Studio 0.4's `sk-lm-<id>:<passkey>`, split in its two fields) or a passkey derived from
the key, stable per client so that LM Studio sees one client across its namespaces.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

from ..server.auth import AuthCounters, AuthState, ClientKey
from ..engine.lifecycle import OWNER_CLIENT
from ..errors import AdminRequired, InvalidApiKey, ModelNotAllowed, ProxyError, clip

# Namespaces only the admin token may open: plugins and runtimes change what runs on the host,
# diagnostics streams LM Studio's log (every client's prompts). (The Python SDK's AsyncClient
# opens /repository and /system on every connect, so those are checked call by call instead.)
ADMIN_NAMESPACES = frozenset({"plugins", "runtime", "diagnostics"})
# What a client key may call where the rest changes the host (downloads, uploads to the hub,
# logins, starting and stopping LM Studio's server, notifications): everything else needs
# the admin token, endpoints LM Studio adds later included.
KEY_ENDPOINTS = {
    "system": frozenset({"alive", "getExperimentFlags", "listDownloadedModels", "version"}),
    "repository": frozenset({"searchModels", "getModelDownloadOptions",
                             "getLocalArtifactFiles"}),
}
MODEL_NAMESPACES = frozenset({"llm", "embedding"})
# Frames that ask for something, and the error frame that answers each (with its id's field).
REQUESTS = {"channelCreate": ("channelError", "channelId"),
            "rpcCall": ("rpcError", "callId"),
            "signalSubscribe": ("signalError", "subscribeId"),
            "writableSignalSubscribe": ("writableSignalError", "subscribeId")}
PASS_KEY = ("Pass the proxy's key as the client passkey. JavaScript: new LMStudioClient("
            "{ baseUrl, clientPasskey: key }). Python (lmstudio has no parameter for it): a "
            "subclass of lmstudio.Client whose _create_auth_message(self) returns "
            "self._format_auth_message(client_key=key). A raw websocket: the header "
            "'Authorization: Bearer <key>' on the upgrade.")
_DERIVE_SECRET = secrets.token_bytes(32)   # upstream passkeys: stable for this process only


@dataclass(frozen=True)
class Refusal:
    """A refused action, as LM Studio's SDKs show errors: title, cause, suggestion."""
    error: ProxyError
    cause: str
    suggestion: str

    def serialized(self) -> dict[str, Any]:
        return {"title": self.error.message, "cause": self.cause,
                "suggestion": self.suggestion, "errorData": {"code": self.error.code}}

    def auth_result(self, structured: bool) -> str:
        """The handshake's `{"success": false, "error": ...}`. The JavaScript SDK (and the
        protocol's schema) takes a string; the Python SDK reads the error's fields (a string
        makes it raise ValueError instead of its message), so it gets them."""
        if structured:
            error: Any = self.serialized()
        else:
            error = f"{self.error.message} {self.cause} {self.suggestion}"
        return orjson.dumps({"success": False, "error": error}).decode()


@dataclass
class Admitted:
    """An accepted connection: who it is, what it may do, what LM Studio gets to see."""
    key: ClientKey | None        # None: anonymous (no client keys configured)
    enforced: bool               # auth is on: scopes and admin rights apply
    owner: str                   # `sdk:<clientIdentifier>`: the owner of what it loads
    upstream_frame: str


def handshake(state: AuthState, namespace: str, frame_text: str | None,
              header_key: ClientKey | None, upstream_token: str | None
              ) -> Admitted | Refusal:
    """Decide on a connection's first frame (None: it sent no text frame)."""
    frame = _parse(frame_text) if frame_text is not None else None
    ident = frame.get("clientIdentifier") if frame else None
    ident = ident if isinstance(ident, str) and ident else "unknown"
    owner = OWNER_CLIENT + clip(ident, 64)   # the client's words: stats and logs show it
    ring = state.ring
    if not ring.enabled:
        return Admitted(None, False, owner, frame_text or "")
    passkey = frame.get("clientPasskey") if frame else None
    key = header_key or (ring.match(passkey) if isinstance(passkey, str) and passkey else None)
    counters = state.counters
    if key is None and ring.keys:
        reason = "missing_key" if not isinstance(passkey, str) or frame_text is None \
            else "invalid_key"
        counters.reject(reason)
        return Refusal(InvalidApiKey("This LM Studio is behind a proxy that needs a client "
                                     "key (its auth.keys)."),
                       "The connection came with no key the proxy knows: neither a "
                       "clientPasskey nor an 'Authorization: Bearer' header matched one.",
                       PASS_KEY)
    if namespace in ADMIN_NAMESPACES and not (key and key.is_admin):
        counters.reject("admin_required")
        return Refusal(AdminRequired(f"LM Studio's '{namespace}' API changes or reads the "
                                     "host: it needs the proxy's admin token."),
                       f"The proxy gives /{namespace} to the admin token only "
                       "(auth.admin_token).", "Connect with the admin token as the client "
                       "passkey, or use LM Studio directly on its host.")
    if key is None:
        # Admin token only: clients are anonymous, as on the HTTP routes; the frame is theirs.
        return Admitted(None, True, owner, frame_text or "")
    counters.requests_by_key[key.name] = counters.requests_by_key.get(key.name, 0) + 1
    return Admitted(key, True, owner, upstream_auth(ident, key, upstream_token))


def upstream_auth(ident: str, key: ClientKey, upstream_token: str | None) -> str:
    """The auth frame for LM Studio once a proxy key was accepted: never the key itself."""
    if upstream_token:
        token_id, sep, token_key = upstream_token.partition(":")
        ident, passkey = (token_id, token_key) if sep else (ident, upstream_token)
    else:
        passkey = hmac.new(_DERIVE_SECRET, f"{key.name}\0{ident}".encode(),
                           hashlib.sha256).hexdigest()
    return orjson.dumps({"authVersion": 1, "clientIdentifier": ident,
                         "clientPasskey": passkey}).decode()


@dataclass
class LoadBook:
    """Which instances each key loaded over the native protocol, and for which owner: a key
    may unload those without the admin token (while the same load is still there)."""
    loads: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, key_name: str, identifier: str, owner: str) -> None:
        self.discard(identifier)          # an identifier loaded anew is its newest loader's
        self.loads.setdefault(key_name, {})[identifier] = owner

    def discard(self, identifier: str) -> None:
        for by_key in self.loads.values():
            by_key.pop(identifier, None)

    def owner_of(self, key_name: str, identifier: str) -> str | None:
        return self.loads.get(key_name, {}).get(identifier)


class Guard:
    """One connection's checks, frame by frame; None from `check` lets a frame through."""

    def __init__(self, admitted: Admitted, namespace: str, book: LoadBook,
                 resolve: Callable[[str], tuple[str | None, str | None]],
                 counters: AuthCounters | None = None) -> None:
        """`resolve(identifier)` → (model key, current owner) in the engine's view; refusals
        are counted in `counters` by reason, as the HTTP routes' are."""
        self.key, self.owner, self.ns = admitted.key, admitted.owner, namespace
        self.enforced = admitted.enforced
        self.book, self.resolve = book, resolve
        self.counters = counters

    @property
    def name(self) -> str:
        return self.key.name if self.key is not None else "anonymous"

    @property
    def admin(self) -> bool:
        return self.key is not None and self.key.is_admin

    def check(self, frame: dict[str, Any], refs: dict[str, str]) -> Refusal | None:
        refused = self._check(frame, refs)
        if refused is not None and self.counters is not None:
            self.counters.reject(refused.error.code or "refused")
        return refused

    def _check(self, frame: dict[str, Any], refs: dict[str, str]) -> Refusal | None:
        if not self.enforced or self.admin:
            return None
        kind, endpoint = frame.get("type"), frame.get("endpoint")
        if kind not in REQUESTS:
            return None
        allowed = KEY_ENDPOINTS.get(self.ns)
        if allowed is not None and endpoint not in allowed:
            return _admin(f"'{self.ns}.{clip(str(endpoint))}' changes LM Studio's host")
        if self.ns not in MODEL_NAMESPACES:
            return None
        param = frame.get("parameter" if kind == "rpcCall" else "creationParameter")
        if kind == "rpcCall" and endpoint == "unloadModel":
            return self._unload(param)
        for name in self._names(endpoint, param, refs):
            refused = self._scope(name)
            if refused is not None:
                return refused
        return None

    def _names(self, endpoint: Any, param: Any, refs: dict[str, str]) -> list[str | None]:
        """The models a request names (None: one it names in a way the proxy cannot tell)."""
        if not isinstance(param, dict):
            return []
        if endpoint == "loadModel":
            return [_str(param.get("modelKey"))]
        if endpoint == "getOrLoad":
            return [_str(param.get("identifier"))]
        names = []
        for field_name in ("modelSpecifier", "specifier"):
            if field_name in param:
                names.append(_specified(param[field_name], refs))
        if "draftModelKey" in param:
            names.append(_str(param.get("draftModelKey")))
        return names

    def _scope(self, name: str | None) -> Refusal | None:
        key = self.key
        if key is None or key.models is None:
            return None
        if name is None:
            return Refusal(ModelNotAllowed(f"This key ('{key.name}') is limited to some "
                                           "models: name the model."),
                           "The request asked for any loaded model, or by path or an "
                           "instance reference the proxy has not seen.",
                           "Ask for the model by its key or identifier.")
        model, _ = self.resolve(name)     # what LM Studio will use, not what the name says
        if key.allows(model) if model is not None else key.allows(name):
            return None
        return Refusal(ModelNotAllowed(f"This key ('{key.name}') may not use the model "
                                       f"'{clip(name)}'."),
                       "The proxy's auth.keys limits this key to other models.",
                       "Use a model the key allows, or a key that allows this one.")

    def _unload(self, param: Any) -> Refusal | None:
        ident = _str(param.get("identifier")) if isinstance(param, dict) else None
        refused = self._scope(ident)
        if refused is not None:
            return refused
        if ident is not None:
            loaded_for = self.book.owner_of(self.name, ident)
            model, owner = self.resolve(ident)
            # The model's owner is the first instance's: an extra instance (an identifier of
            # its own) is the key's while the book says so and it is there.
            if loaded_for is not None and model is not None and (
                    owner == loaded_for or ident != model):
                return None
        return _admin(f"'{clip(ident or '?')}' was not loaded with this key")

    def loaded(self, identifier: str) -> None:
        """A load on this connection finished: the key may unload it later."""
        if self.enforced:
            self.book.add(self.name, identifier, self.owner)

    def unloaded(self, identifier: str) -> None:
        self.book.discard(identifier)


def _admin(why: str) -> Refusal:
    return Refusal(AdminRequired(f"{why}: that needs the proxy's admin token."),
                   "Only the admin token may unload what other clients loaded or change "
                   "the host.", "Ask the proxy's admin, or connect with the admin token.")


def _specified(spec: Any, refs: dict[str, str]) -> str | None:
    if not isinstance(spec, dict):
        return None
    if spec.get("type") == "instanceReference":
        return refs.get(spec.get("instanceReference"))     # type: ignore[arg-type]
    query = spec.get("query")
    if not isinstance(query, dict) or query.get("path") is not None:
        return None
    return _str(query.get("identifier"))


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _parse(text: str) -> dict[str, Any] | None:
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return frame if isinstance(frame, dict) else None

