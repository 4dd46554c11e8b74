"""What a client key limited to models sees of the rest of the proxy: only its own models.

`GET /v1/models` lists such a key only its models; the read endpoints follow the same rule
(security.md, "What a limited key sees"): `/proxy/models`, `/proxy/stats`, `/proxy/health`,
`/proxy/timeline`, `/proxy/recommendations` and `/proxy/events` leave every other model out
(its row, its figures, its name in a list or a group), the per-key request counts show the
key's own only (in /metrics too, when a client key may scrape it), and a refusal it gets
(group_busy, insufficient_memory, "Did you mean") names no other model. A key without
`models`, the admin token and anonymous clients (no keys configured) see everything.

Models are left out by name wherever they appear, not field by field, so a field added to a
view later is covered too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from ..errors import ProxyError
from .auth import CLIENT_KEY
from .keys import CONFIG, ENGINE

OTHER_MODEL = "another model"
_QUOTED = re.compile(r"'([^'\n]{1,300})'")
_HINT = re.compile(r" Did you mean: ([^?]*)\?")


@dataclass(frozen=True)
class Scope:
    key_name: str
    hidden: frozenset[str]      # the other models' keys and instance ids
    # Their configured aliases: only looked for in messages, where a name is quoted (in
    # the views an alias is only ever in its own model's row, and a short alias such as
    # "fast" could be any other word there).
    hidden_aliases: frozenset[str]

    def sees(self, name: Any) -> bool:
        return not (isinstance(name, str) and name in self.hidden)

    def may_name(self, name: str) -> bool:
        return name not in self.hidden and name not in self.hidden_aliases


def scope_of(request: web.Request) -> Scope | None:
    """The request's scope; None when it may see every model."""
    key = request.get(CLIENT_KEY)
    if key is None or key.models is None:
        return None
    engine = request.app[ENGINE]
    hidden: set[str] = set()
    for name in engine.known_models():
        if name not in key.models:
            hidden.add(name)
            e = engine.entry(name)
            if e is not None:
                hidden.update(e.instance_ids)
    aliases = request.app[CONFIG].current.alias_map()
    return Scope(key.name, frozenset(hidden - key.models),
                 frozenset(a for a in aliases if a not in key.models))


def scrub(value: Any, scope: Scope) -> Any:
    """`value` (decoded JSON) without the hidden models: dict entries keyed by one, list items
    naming one (the name, or an object whose `model` it is); a lone name becomes null, and
    one in a text (a preload's "follows <model>") "another model"."""
    if isinstance(value, dict):
        return {k: scrub(v, scope) for k, v in value.items() if scope.sees(k)}
    if isinstance(value, list):
        return [scrub(v, scope) for v in value if scope.sees(v) and
                not (isinstance(v, dict) and not scope.sees(v.get("model")))]
    if isinstance(value, str):
        return _text(value, scope)
    return value


def _text(text: str, scope: Scope) -> str | None:
    if not scope.sees(text):
        return None
    if " " not in text:
        return text
    words = text.split(" ")
    for i, word in enumerate(words):
        name = word.strip("'\"(),;:")
        if name and not scope.sees(name):
            words[i] = word.replace(name, OTHER_MODEL)
    return " ".join(words)


def view(request: web.Request, data: Any) -> Any:
    scope = scope_of(request)
    return data if scope is None else scrub(data, scope)


def stats(request: web.Request, out: dict[str, Any]) -> dict[str, Any]:
    """/proxy/stats for the request: counts of models by state among those it sees, and of
    the per-key request counts its own only (the admin token's to read)."""
    scope = scope_of(request)
    if scope is None:
        return out
    out = scrub(out, scope)
    counts = dict.fromkeys(out.get("model_counts") or {}, 0)
    for row in (out.get("models") or {}).values():
        hosts = row.get("hosts")
        for state in (hosts.values() if isinstance(hosts, dict) else (row.get("state"),)):
            if state in counts:
                counts[state] += 1
    out["model_counts"] = counts
    auth = out.get("auth")
    if isinstance(auth, dict):
        own = auth.get("requests_by_key", {}).get(scope.key_name)
        auth["requests_by_key"] = {} if own is None else {scope.key_name: own}
    return out


def metrics(request: web.Request, body: bytes) -> bytes:
    """The exposition for a limited key (`auth.metrics_access: key`): of the requests per
    key, its own series only. (The per-model series stay: /metrics is the whole proxy's.)"""
    scope = scope_of(request)
    if scope is None:
        return body
    own = scope.key_name.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    label = b'{key="' + own.encode() + b'"}'
    return b"\n".join(line for line in body.split(b"\n")
                      if not line.startswith(b"proxy_requests_by_key_") or label in line)


def events(scope: Scope | None, data: bytes) -> bytes:
    """Server-sent events as the scope may see them: an event about a hidden model is left
    out, the others scrubbed. (Each event is `…data: <one line of JSON>\\n\\n`.)"""
    if scope is None or not data:
        return data
    out = []
    for block in data.split(b"\n\n"):
        lines = block.split(b"\n")
        at = next((i for i, line in enumerate(lines) if line.startswith(b"data: ")), None)
        if at is not None:
            try:
                body = orjson.loads(lines[at][6:])
            except orjson.JSONDecodeError:
                continue
            if isinstance(body, dict) and _about_hidden(body, scope):
                continue
            lines[at] = b"data: " + orjson.dumps(scrub(body, scope))
        if block:
            out.append(b"\n".join(lines) + b"\n\n")
    return b"".join(out)


def _about_hidden(body: dict[str, Any], scope: Scope) -> bool:
    """An event about a hidden model: its `model` (or its alert's) is one."""
    return any(isinstance(d, dict) and not scope.sees(d.get("model"))
               for d in (body, *body.values()))


def error(request: web.Request, exc: ProxyError) -> ProxyError:
    """The refusal as the request may read it: a hidden model's quoted name becomes "another
    model", and a "Did you mean" names only models the key may use."""
    scope = scope_of(request)
    if scope is None:
        return exc
    message = _HINT.sub(lambda m: _hint(m.group(1), scope), exc.message)
    message = _QUOTED.sub(lambda m: m.group(0) if scope.may_name(m.group(1)) else OTHER_MODEL,
                          message)
    if message == exc.message:
        return exc
    # A copy: one refusal may be raised to every request that waited on the same load.
    scoped = type(exc).__new__(type(exc))
    scoped.__dict__.update(exc.__dict__)
    scoped.message = message
    scoped.args = (message,)
    return scoped


def _hint(names: str, scope: Scope) -> str:
    kept = [n for n in names.split(", ") if scope.may_name(n.strip("'"))]
    return f" Did you mean: {', '.join(kept)}?" if kept else ""
