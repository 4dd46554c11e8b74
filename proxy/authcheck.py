"""The checks of `auth:`: each client key named, given one way, its names allowed; and no
secret given twice. Two client keys with one secret are one key to the proxy (a request with
it counts as one of them, with that one's models), and an admin token that is a client's key
makes that client the admin: both are refused, naming the entries, never the secret.

A secret read from the environment (`key_env`, `admin_token_env`) is known only once it is read
(server/auth.py `resolve_secrets`), which checks again with it."""
from __future__ import annotations

import hashlib
from typing import Mapping, NamedTuple

from .config import AuthConfig


class Secret(NamedTuple):
    path: str               # its entry: auth.admin_token, auth.keys[<i>]
    name: str               # how a problem names it
    var: str | None         # the environment variable it was read from
    digest: bytes           # SHA-256

    def shown(self) -> str:
        return f"{self.name} ({self.path}{f', from {self.var}' if self.var else ''})"


def digest(secret: str) -> bytes:
    # A header's bytes that are not UTF-8 arrive as lone surrogates: hashed as they came, they
    # match no key (a 401), instead of failing to encode (a 500).
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def auth_problems(auth: AuthConfig) -> list[str]:
    problems: list[str] = []
    names: set[str] = set()
    for i, k in enumerate(auth.keys):
        path = f"auth.keys[{i}]"
        if not k.name:
            problems.append(f"{path}.name: required (it labels the key in stats and logs)")
        elif k.name in names:
            problems.append(f"{path}.name: '{k.name}' is used by another key")
        elif k.name == "admin":
            problems.append(f"{path}.name: 'admin' is the admin token's label; pick another")
        names.add(k.name)
        given = [f for f in ("key", "key_sha256", "key_env") if getattr(k, f)]
        if len(given) != 1:
            problems.append(f"{path}: needs exactly one of key, key_sha256, key_env "
                            f"(got {', '.join(given) or 'none'})")
        if k.key_sha256 and not _is_sha256(k.key_sha256):
            problems.append(f"{path}.key_sha256: must be 64 hex digits (sha256 of the key)")
        if k.models is not None and not k.models:
            problems.append(f"{path}.models: empty list allows no model; omit it to allow all")
    if auth.admin_token and auth.admin_token_env:
        problems.append("auth: admin_token and admin_token_env are exclusive")
    if not problems:
        problems += secret_clashes(known_secrets(auth))
    return problems


def known_secrets(auth: AuthConfig, read_from: Mapping[str, str] | None = None) -> list[Secret]:
    """The secrets the configuration holds (not those still to be read from the environment),
    the admin token's first; `read_from`: entry's path → the variable its secret was read
    from, named in the problems."""
    read_from = read_from or {}
    out: list[Secret] = []
    if auth.admin_token:
        out.append(Secret("auth.admin_token", "the admin token",
                          read_from.get("auth.admin_token"), digest(auth.admin_token)))
    for i, k in enumerate(auth.keys):
        path = f"auth.keys[{i}]"
        if k.key:
            secret = digest(k.key)
        elif k.key_sha256 and _is_sha256(k.key_sha256):
            secret = bytes.fromhex(k.key_sha256)
        else:
            continue
        out.append(Secret(path, f"client key '{k.name}'", read_from.get(path), secret))
    return out


def secret_clashes(secrets: list[Secret]) -> list[str]:
    """One problem per entry whose secret an earlier entry has already."""
    first: dict[bytes, Secret] = {}
    problems = []
    for secret in secrets:
        earlier = first.setdefault(secret.digest, secret)
        if earlier is secret:
            continue
        from_var = f" (from {secret.var})" if secret.var else ""
        same = f"{secret.path}: {secret.name}{from_var} has the same secret as {earlier.shown()}"
        if earlier.path == "auth.admin_token":
            problems.append(f"{same}: that client would be the admin; give the admin token "
                            "a secret of its own")
        else:
            problems.append(f"{same}: a request with it would count as one of them only, "
                            "with that one's models; give each key its own secret")
    return problems


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)
