"""The schema engine behind config.py: frozen dataclasses built from plain mappings, every
problem reported at once with its dotted path. Range and choice rules live in each field's
metadata (`rule(...)`), so the dataclasses stay the single source of truth."""
from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from typing import Any, Callable, Mapping


def rule(lo: float | None = None, hi: float | None = None, *,
          choices: tuple[str, ...] | Callable[[], tuple[str, ...]] = (),
          exclusive_lo: bool = False, upper: bool = False) -> dict[str, Any]:
    """upper: a string taken in any case and kept in upper case (standard names, such as log
    levels, that people write either way)."""
    return {"lo": lo, "hi": hi, "choices": choices, "exclusive_lo": exclusive_lo,
            "upper": upper}



def deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [deep_copy(v) for v in value]
    return value


def build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """cls.RETIRED, if it has one: {key an earlier release took: what to write instead}."""
    if not isinstance(data, dict):
        problems.append(f"{path or '<root>'}: must be a mapping (got {_kind(data)})")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    retired = getattr(cls, "RETIRED", {})
    for key in data:
        if key in retired:   # a key of an earlier release: what to write instead
            problems.append(f"{_join(path, str(key))}: {retired[key]}")
        elif key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(f"{_join(path, str(key))}: unknown key (known: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            before = len(problems)
            raw = data[name]
            if raw is False and "off" in f.metadata.get("words", ()):
                raw = "off"    # YAML 1.1 reads an unquoted `off` as false
            if isinstance(raw, str) and f.metadata.get("upper"):
                raw = raw.upper()
            value = _convert(hints[name], raw, _join(path, name), problems)
            if len(problems) == before:
                _check_rule(f.metadata, value, _join(path, name), problems)
                kwargs[name] = value
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        # The first member the value converts to cleanly wins; else report the first's errors.
        attempts = []
        for arg in args:
            tried: list[str] = []
            converted = _convert(arg, value, path, tried)
            if not tried:
                return converted
            attempts.append(tried)
        # A mapping was meant for the member that is a dataclass: report its errors.
        meant = next((i for i, a in enumerate(args)
                      if isinstance(value, dict) and dataclasses.is_dataclass(a)), 0)
        problems.extend(attempts[meant])
        return None
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, problems)
    if origin in (collections.abc.Mapping, dict):
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{path}: must be a mapping (got {_kind(value)})")
            return {}
        if val_tp is Any:
            return dict(value)
        return {str(k): _convert(val_tp, v if v is not None else {}, _join(path, str(k)), problems)
                for k, v in value.items()}
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{path}: must be a list (got {_kind(value)})")
            return ()
        return tuple(_convert(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{path}: must be {_TYPE_NAMES.get(tp, str(tp))} (got {_kind(value)} "
                    f"{value!r})")
    return None


def _check_rule(meta: Mapping[str, Any], value: Any, path: str, problems: list[str]) -> None:
    if not meta or value is None:
        return
    if isinstance(value, str) and "words" in meta:
        if value not in meta["words"]:
            problems.append(f"{path}: must be a number of seconds or one of "
                            f"{', '.join(meta['words'])} (got {value!r})")
        return
    choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
    if choices and value not in choices:
        problems.append(f"{path}: must be one of {', '.join(choices)} (got {value!r})")
        return
    lo, hi = meta["lo"], meta["hi"]
    too_low = lo is not None and (value <= lo if meta["exclusive_lo"] else value < lo)
    too_high = hi is not None and value > hi
    if too_low or too_high:
        if hi is not None:
            rng = f"{lo:g}..{hi:g}"
        else:
            rng = f"> {lo:g}" if meta["exclusive_lo"] else f">= {lo:g}"
        problems.append(f"{path}: must be {rng} (got {value!r})")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", type(None): "null"}.get(type(value),
                                                                   type(value).__name__)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
