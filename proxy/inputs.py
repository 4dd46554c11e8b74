"""The values a caller hands the engine's operations, checked once for both ways in: the admin
API's bodies (handlers/admin.py) and the library's arguments (library/manager.py). Each check
returns the value or raises InvalidRequest naming the field, in the same words for both."""
from __future__ import annotations

import math

from .errors import InvalidRequest

PRIORITY_MIN, PRIORITY_MAX = 1, 10


def model_name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest("'model' is required and must be a string.", param="model")
    return value


def priority(value: object) -> int | None:
    """None: the model's configured priority."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not PRIORITY_MIN <= value <= PRIORITY_MAX):
        raise InvalidRequest(f"'priority' must be an integer {PRIORITY_MIN}..{PRIORITY_MAX}.",
                             param="priority")
    return value


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false.", param=name)
    return value


def number(name: str, value: object, *, minimum: float | None = None,
           text: bool = False) -> float:
    """A finite number, at least `minimum`; with `text`, a numeric string too (a query
    parameter's value)."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str) if text else
                                                     (int, float)):
            raise ValueError
        result = float(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be a number.", param=name) from None
    if not math.isfinite(result):
        raise InvalidRequest(f"'{name}' must be a finite number.", param=name)
    if minimum is not None and result < minimum:
        raise InvalidRequest(f"'{name}' must be at least {minimum:g}.", param=name)
    return result


def count(name: str, value: object) -> int:
    """A whole number, zero or more (tokens)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidRequest(f"'{name}' must be an integer of 0 or more.", param=name)
    return value
