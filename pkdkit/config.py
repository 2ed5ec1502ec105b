"""Typed configuration from plain values (YAML, JSON, the command line): one checker for every dataclass.

`check_fields(cls, values, where)` checks each value against the type annotation of the dataclass field of
the same name and returns the values, with numbers written as strings read as numbers: PyYAML follows YAML
1.1, which reads ``lr: 1e-3`` (no dot) as the string ``"1e-3"``. Errors name `where` and the field.
"""
from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any

from pkdkit.errors import ConfigError


def _split_union(type_str: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in type_str:
        depth += (ch == "[") - (ch == "]")
        if ch == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + [current.strip()]


def _convert(value: Any, type_str: str) -> Any:
    """`value` as `type_str` ("int", "float | None", "tuple[int, ...] | None", ...); raises TypeError."""
    for alt in _split_union(type_str):
        base, _, inner = alt.partition("[")
        inner = inner[:-1].replace(", ...", "").strip() if inner else "Any"
        if base == "None":
            if value is None:
                return None
            continue
        if base == "Any" or base[:1].isupper():  # another class (DetectorSpec, Stage): checked by itself
            return value
        if base == "bool" and isinstance(value, bool):
            return value
        if base == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base == "float" and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if base == "str" and isinstance(value, str):
            return value
        if base == "dict" and isinstance(value, dict):
            return value
        if base in ("tuple", "list") and isinstance(value, (list, tuple)):
            items = [_convert(v, inner) for v in value]
            return tuple(items) if base == "tuple" else items
    raise TypeError(f"expected {type_str}, found {value!r} ({type(value).__name__})")


def check_value(value: Any, type_str: str, where: str) -> Any:
    """`value` converted to the annotation `type_str`, or ConfigError naming `where`."""
    try:
        return _convert(value, type_str)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_fields(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a dict meant for the dataclass `cls`: known keys only, each of its field's annotated type.
    Fields typed as another class (a nested dataclass) are passed through: that class checks them."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, found {values!r} ({type(values).__name__})")
    types = {f.name: f.type for f in fields(cls)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(types)}")
    out = dict(values)
    for name, value in values.items():
        t = types[name] if isinstance(types[name], str) else getattr(types[name], "__name__", "Any")
        out[name] = check_value(value, t, f"{where}: {name}")
    return out


def check_range(where: str, value: float | int | None, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """A finite number within [lo, hi] (open ends where asked); None passes."""
    if value is None:
        return
    ok = math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo)) \
        and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
        bounds = " and ".join(s for s in (lo_s, hi_s) if s)
        raise ConfigError(f"{where} must be a finite number{' ' + bounds if bounds else ''}, got {value}")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_diff(saved: dict[str, Any], now: dict[str, Any], ignore: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The settings that differ between two (nested) configs, as ``"train.lr: 0.001 -> 0.1"``; keys whose last
    part is in `ignore` (device, progress display, ...) are left out. Both sides are compared as JSON."""
    a, b = (_flatten(json.loads(json.dumps(x, default=str))) for x in (saved, now))
    keys = sorted(k for k in set(a) | set(b) if k.rsplit(".", 1)[-1] not in ignore and a.get(k) != b.get(k))
    def show(d: dict[str, Any], k: str) -> str:
        return repr(d[k]) if k in d else "(not set)"

    return [f"{k}: {show(a, k)} -> {show(b, k)}" for k in keys]
