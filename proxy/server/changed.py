"""What a reload changed, as dotted key names fit for the log.

A number, a boolean or a null is shown with its old and new value; so is a string, unless its
key's name says it may hold a secret or credentials (a token, a key, a password, a URL): those,
lists (client keys, hosts, aliases) and whole sections added or removed are named without
their values. So no secret reaches the log, whatever the file holds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..errors import clip

HIDDEN = ("token", "key", "secret", "password", "url")
_SHOWN = (bool, int, float, type(None))


def changed_keys(old: Any, new: Any, path: str = "") -> list[str]:
    """The dotted keys whose value differs between two configurations (or parts of one)."""
    if old == new:
        return []
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        return [change for f in dataclasses.fields(old)
                for change in changed_keys(getattr(old, f.name), getattr(new, f.name),
                                           _join(path, f.name))]
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            key = _join(path, clip(str(k), 100))
            if k not in old:
                out.append(f"{key} (added)")
            elif k not in new:
                out.append(f"{key} (removed)")
            else:
                out += changed_keys(old[k], new[k], key)
        return out
    return [_describe(path, old, new)]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(path: str, old: Any, new: Any) -> str:
    name = path.rpartition(".")[2].lower()
    plain = all(isinstance(v, _SHOWN) for v in (old, new)) or (
        all(isinstance(v, (str, type(None))) for v in (old, new)) and
        not any(word in name for word in HIDDEN))
    return f"{path} ({clip(repr(old), 60)} → {clip(repr(new), 60)})" if plain else path
