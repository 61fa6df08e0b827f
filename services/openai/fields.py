"""Typed readers for fields of a JSON request body; a wrong type or range is a 400 naming the field.

Absent and null fields read as None (the caller applies the default), as OpenAI's API does.
"""

from __future__ import annotations

from typing import Any

from pdserve.openai.errors import invalid


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def opt_int(body: dict[str, Any], name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    """body[name] as an int in [lo, hi] (bounds optional), or None when absent/null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise invalid(f"{name} must be an integer, got {value!r}", name)
    _check_range(name, value, lo, hi)
    return value


def opt_float(body: dict[str, Any], name: str, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False) -> float | None:
    """body[name] as a float in [lo, hi] ((lo, hi] with lo_open), or None when absent/null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise invalid(f"{name} must be a number, got {value!r}", name)
    value = float(value)
    if lo_open and lo is not None and value <= lo:
        raise invalid(f"{name} must be > {lo} and <= {hi}, got {value}", name)
    _check_range(name, value, lo, hi)
    return value


def opt_bool(body: dict[str, Any], name: str) -> bool | None:
    """body[name] as a bool, or None when absent/null."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise invalid(f"{name} must be a boolean, got {value!r}", name)
    return value


def opt_str(body: dict[str, Any], name: str) -> str | None:
    """body[name] as a str, or None when absent/null."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string, got {type(value).__name__}", name)
    return value


def opt_dict(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    """body[name] as a JSON object, or None when absent/null."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(f"{name} must be an object, got {type(value).__name__}", name)
    return value


def str_list(body: dict[str, Any], name: str, max_items: int, max_chars: int) -> list[str]:
    """body[name] as a list of 1..max_chars-character strings (a lone string is a list of one);
    [] when absent/null."""
    value = body.get(name)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid(f"{name} must be a string or a list of strings", name)
    if len(items) > max_items:
        raise invalid(f"{name} has {len(items)} entries; at most {max_items} are allowed", name)
    for s in items:
        if not 0 < len(s) <= max_chars:
            raise invalid(f"each {name} entry must have 1 to {max_chars} characters", name)
    return items


def int_list(body: dict[str, Any], name: str, lo: int = 0) -> list[int]:
    """body[name] as a list of ints >= lo; [] when absent/null."""
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_int(v) and v >= lo for v in value):
        raise invalid(f"{name} must be a list of integers >= {lo}", name)
    return value


def reject_if_set(body: dict[str, Any], name: str, allowed: tuple[Any, ...] = (None,)) -> None:
    """A 400 naming `name` when the request sets it to something this server does not support."""
    if body.get(name, None) not in allowed:
        raise invalid(f"{name} is not supported by this server", name, "unsupported_parameter")


def _check_range(name: str, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and value < lo:
        raise invalid(f"{name} must be >= {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise invalid(f"{name} must be <= {hi}, got {value}", name)
