"""A plain mapping (a parsed file, dotted-path overrides) read into a validated Config, and a
Config written back as one (`to_raw`, for a reload with overrides)."""
from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any, Mapping

from .config import Config
from .errors import ConfigError
from .schema import build, deep_copy


def load_config(raw: Mapping[str, Any] | None = None, *,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a Config from a parsed mapping plus dotted-path overrides; raise ConfigError."""
    data: dict[str, Any] = deep_copy(raw or {})
    if not isinstance(data, dict):
        raise ConfigError([f"<root>: must be a mapping (got {type(data).__name__})"])
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    _inherit_upstream(data)
    problems: list[str] = []
    config = build(Config, data, "", problems)
    if not problems:
        from .configcheck import cross_checks   # it reads the dataclasses above
        cross_checks(config, problems)
    if problems:
        raise ConfigError(problems)
    return config


def _inherit_upstream(data: dict[str, Any]) -> None:
    """Each host of `upstreams:` takes the keys it does not set from `upstream:` (the URL and
    token excepted: a host's address and credentials are its own)."""
    hosts, base = data.get("upstreams"), data.get("upstream")
    if not isinstance(hosts, list) or not isinstance(base, dict):
        return
    shared = {k: v for k, v in base.items() if k not in ("url", "api_token")}
    data["upstreams"] = [{**shared, **h} if isinstance(h, dict) else h for h in hosts]


def replace_config(config: Config, overrides: Mapping[str, Any]) -> Config:
    """A copy of config with dotted-path overrides, validated like a file (ConfigError)."""
    return load_config(to_raw(config), overrides=overrides)


def to_raw(value: Any) -> Any:
    """A Config (or part of one) back as the plain mapping a file would hold."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_raw(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, collections.abc.Mapping):
        return {k: to_raw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [to_raw(v) for v in value]
    return value
