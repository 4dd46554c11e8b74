"""Client API keys and the admin token, checked by `authenticate()` before any handler runs.

Routes fall in five classes: probes (/healthz, /readyz: always open), metrics
(`auth.metrics_access`), read-only admin (GET /proxy/*: `auth.read_only_access`), admin actions
(every other /proxy/* call: the admin token), LM Studio's own protocol (its greeting and
websockets: the key comes in the first frame, checked by native/guard.py; a key in the
upgrade's headers is checked here), and everything else, the OpenAI surface (a client key).
Without an `auth` section every class is open, as on a loopback-only proxy.

Secrets are kept only as SHA-256 digests and compared with hmac.compare_digest against every key,
so neither a match's position nor its prefix shows in the timing. The credential comes in
`Authorization: Bearer …` or `x-api-key` (Anthropic-style clients); it is never forwarded
upstream, accepted or not (the upstream sees `upstream.api_token`, or nothing).
"""
from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ..authcheck import digest as _digest, known_secrets, secret_clashes
from ..config import AuthConfig, Config
from ..errors import AdminRequired, ConfigError, InvalidApiKey, ModelNotAllowed
from ..native import PATHS as NATIVE_PATHS
from ..liveconfig import LiveConfig
from ..origins import is_loopback

CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})
PROBES = frozenset({"/healthz", "/readyz"})
ADMIN_NAME = "admin"   # the admin token's label in counts; no client key may take it
# Marks the proxy's calls to itself on behalf of a request already counted (an MCP tool's call
# to /proxy/*), with a secret only this process knows: the key is checked as for any call.
OWN_CALL_HEADER = "X-Proxy-Own-Call"


@dataclass(frozen=True)
class ClientKey:
    name: str
    digest: bytes
    models: frozenset[str] | None     # names a client may ask for (keys and their aliases)
    is_admin: bool = False

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def resolve_secrets(config: Config, environ: Mapping[str, str]) -> Config:
    """Replace each `key_env` by the digest of the variable's value and `admin_token_env` by
    the token; the caller (the CLI, the one reader of the environment) passes it in. A secret
    read here that another entry has too is refused as one in the file is (authcheck.py)."""
    auth, problems = config.auth, []
    keys = []
    read_from: dict[str, str] = {}    # entry's path → the variable its secret came from
    for i, k in enumerate(auth.keys):
        if k.key_env:
            value = environ.get(k.key_env, "")
            if not value:
                problems.append(f"auth.keys[{i}].key_env: environment variable {k.key_env} "
                                "is not set")
            read_from[f"auth.keys[{i}]"] = k.key_env
            k = replace(k, key_env=None, key_sha256=_digest(value).hex())
        keys.append(k)
    admin = auth.admin_token
    if auth.admin_token_env:
        admin = environ.get(auth.admin_token_env, "")
        if not admin:
            problems.append(f"auth.admin_token_env: environment variable "
                            f"{auth.admin_token_env} is not set")
        read_from["auth.admin_token"] = auth.admin_token_env
    if problems:
        raise ConfigError(problems)
    auth = replace(auth, keys=tuple(keys), admin_token=admin, admin_token_env=None)
    problems = secret_clashes(known_secrets(auth, read_from))
    if problems:
        raise ConfigError(problems)
    return replace(config, auth=auth)


def exposure_problems(config: Config) -> tuple[list[str], list[str]]:
    """(problems that refuse a start, warnings) about who can reach an unprotected proxy."""
    host, auth = config.server.host, config.auth
    if is_loopback(host) or auth.keys:
        problems: list[str] = []
        warnings = []
        if config.upstream.api_token and not auth.keys:
            warnings.append("upstream.api_token is set and auth.keys is empty: every local "
                            "client reaches LM Studio with that token")
        return problems, warnings
    exposed = (f"server.host: {host} is reachable from other machines and auth.keys is "
               "empty, so anyone who can reach it may use every model")
    if config.server.allow_unauthenticated:
        rebinding = [] if config.server.allowed_hosts else [
            "server.allowed_hosts is empty on an unauthenticated server.host: a web page in a "
            "browser that reaches it can read it and change it through DNS rebinding; list the "
            "names clients use there"]
        return [], [exposed + " (server.allow_unauthenticated is true)", *rebinding]
    return [exposed + ": add client keys under auth.keys, or set "
            "server.allow_unauthenticated: true"], []


class KeyRing:
    """The accepted credentials and what each may do; rebuilt on reload."""

    def __init__(self, auth: AuthConfig, alias_map: Mapping[str, str]) -> None:
        self.auth = auth
        self.enabled = auth.enabled
        unresolved = [f"auth.keys[{i}].key_env: not read yet (resolve_secrets() reads it)"
                      for i, k in enumerate(auth.keys) if not (k.key or k.key_sha256)]
        if unresolved:
            raise ConfigError(unresolved)
        self.keys = tuple(self._client_key(k.name, k.key, k.key_sha256, k.models, alias_map)
                          for k in auth.keys)
        self.admin = _digest(auth.admin_token) if auth.admin_token else None

    @staticmethod
    def _client_key(name: str, key: str | None, key_sha256: str | None,
                    models: Iterable[str] | None, alias_map: Mapping[str, str]) -> ClientKey:
        digest = _digest(key) if key else bytes.fromhex(key_sha256 or "")
        allowed = None
        if models is not None:
            keys = {alias_map.get(m, m) for m in models}
            allowed = frozenset(set(models) | keys |
                                {a for a, k in alias_map.items() if k in keys})
        return ClientKey(name, digest, allowed)

    def match(self, secret: str) -> ClientKey | None:
        """The key this secret is, or None; every key is compared, in constant time each."""
        digest = _digest(secret)
        found = None
        for k in self.keys:
            if hmac.compare_digest(digest, k.digest):
                found = k
        if self.admin is not None and hmac.compare_digest(digest, self.admin):
            found = ClientKey(ADMIN_NAME, self.admin, None, is_admin=True)
        return found


class AuthCounters:
    """Requests per key name and refusals per reason: both label sets come from the config."""

    def __init__(self) -> None:
        self.requests_by_key: dict[str, int] = {}
        self.rejected: dict[str, int] = {}

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"requests_by_key": dict(self.requests_by_key), "rejected": dict(self.rejected)}


class AuthCollector(Collector):
    """Refusals by reason, and requests by key name only where /metrics needs a credential:
    open metrics would show anyone which keys exist and how much each is used."""

    def __init__(self, state: "AuthState") -> None:
        self.state = state

    def collect(self) -> Iterable[CounterMetricFamily]:
        counters = self.state.counters
        families = []
        if self.state.ring.auth.metrics_access != "open":   # read per scrape: reloads apply
            by_key = CounterMetricFamily("proxy_requests_by_key", "Requests by client key name",
                                         labels=["key"])
            for name, n in sorted(counters.requests_by_key.items()):
                by_key.add_metric([name], n)
            families.append(by_key)
        rejected = CounterMetricFamily("proxy_auth_rejections", "Requests refused by auth",
                                       labels=["reason"])
        for reason, n in sorted(counters.rejected.items()):
            rejected.add_metric([reason], n)
        return [*families, rejected]


class AuthState:
    """What the middleware reads on every request; `ring` is rebuilt by each config swap."""

    def __init__(self, live: LiveConfig) -> None:
        self.counters = AuthCounters()
        self._ring = live.derive(lambda c: KeyRing(c.auth, c.alias_map()))
        self.own_call_secret = secrets.token_hex(16)

    def own_call_headers(self) -> dict[str, str]:
        """What a call this process makes to itself for a counted request carries."""
        return {OWN_CALL_HEADER: self.own_call_secret}

    def is_own_call(self, request: web.BaseRequest) -> bool:
        sent = request.headers.get(OWN_CALL_HEADER)
        return sent is not None and hmac.compare_digest(sent.encode("utf-8", "replace"),
                                                        self.own_call_secret.encode())

    @property
    def ring(self) -> KeyRing:
        return self._ring.value


CLIENT_KEY = web.RequestKey("client_key", ClientKey)
STATE = web.AppKey("auth", AuthState)   # app state (server.keys.AUTH is this key)


def presented_secret(request: web.BaseRequest) -> str | None:
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key") or None


def _route_class(request: web.BaseRequest) -> str:
    path = request.path
    if path in PROBES or path == "/ui" or path.startswith("/ui/"):
        return "open"      # probes, and the dashboard's static files: data needs the token
    if path in NATIVE_PATHS:
        return "native"   # the key comes in the first frame: native/guard.py checks it
    if path == "/metrics":
        return "metrics"
    if path.startswith("/proxy/"):
        return "read" if request.method in ("GET", "HEAD") else "admin"
    return "client"


def authenticate(state: AuthState, request: web.Request) -> None:
    """Raise InvalidApiKey / AdminRequired unless the request may go on; called by the app's
    outer middleware before the handler (a plain call: no middleware layer of its own)."""
    ring = state.ring
    if not ring.enabled:
        return
    route = _route_class(request)
    if route == "open":
        return
    if route == "native":
        _native_header(state, request)
        return
    auth = ring.auth
    level = {"metrics": auth.metrics_access, "read": auth.read_only_access,
             "admin": "admin", "client": "key"}[route]
    if level == "open":
        return
    secret = presented_secret(request)
    key = ring.match(secret) if secret else None
    if level == "key" and not ring.keys and key is None:
        return   # no client keys configured: clients are anonymous
    counters = state.counters
    if key is None:
        reason = "missing_key" if secret is None else "invalid_key"
        counters.reject(reason)
        raise InvalidApiKey("Missing API key: send 'Authorization: Bearer <key>'."
                            if secret is None else "Invalid API key.")
    if level == "admin" and not key.is_admin:
        counters.reject("admin_required")
        raise AdminRequired("This action needs the admin token (auth.admin_token)."
                            if ring.admin is not None else
                            "Admin actions are disabled: no auth.admin_token is configured.")
    request[CLIENT_KEY] = key
    if not state.is_own_call(request):   # the request it serves was counted already
        counters.requests_by_key[key.name] = counters.requests_by_key.get(key.name, 0) + 1


def _native_header(state: AuthState, request: web.Request) -> None:
    """LM Studio's SDKs send their key in the first frame, which the handshake checks; a key
    in the upgrade's headers is checked here (a wrong one is a 401 before the upgrade)."""
    secret = presented_secret(request)
    if secret is None:
        return
    key = state.ring.match(secret)
    if key is None:
        state.counters.reject("invalid_key")
        raise InvalidApiKey("Invalid API key.")
    request[CLIENT_KEY] = key


def check_model(request: web.Request, model: str) -> None:
    """403 when the authenticated key is limited to other models (called before any lookup)."""
    key = request.get(CLIENT_KEY)
    if key is not None and not key.allows(model):
        raise not_allowed(request, f"This API key ('{key.name}') may not use this model.")


def allowed_models(request: web.Request) -> frozenset[str] | None:
    """The names (keys and aliases) the authenticated key may use; None: any model."""
    key = request.get(CLIENT_KEY)
    return None if key is None else key.models


def not_allowed(request: web.Request, message: str) -> ModelNotAllowed:
    request.app[STATE].counters.reject("model_not_allowed")   # an auth refusal
    return ModelNotAllowed(message, param="model")


def visible_models(request: web.Request, raw: bytes) -> bytes:
    """GET /v1/models as a key limited to models sees only those (the rest is not its business)."""
    key = request.get(CLIENT_KEY)
    if key is None or key.models is None:
        return raw
    try:
        listing = orjson.loads(raw)
        listing["data"] = [m for m in listing["data"] if key.allows(m.get("id"))]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return raw
    return orjson.dumps(listing)
