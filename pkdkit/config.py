"""Typed configuration from plain values (YAML, JSON, the command line): one checker for every dataclass.

`check_fields(cls, values, where)` checks a mapping meant for the dataclass `cls` (known keys only,
`check_keys`; each value of its field's type) and returns the values converted; `check_types(obj, where)` does
the same for the fields of a dataclass instance (its `__post_init__`). Types are the fields' real annotations (`typing.get_type_hints`): ``X | None``, ``tuple[float, ...]``,
``tuple[int, int]``, ``list[int] | None``, ``dict[str, Any]``, ``float | str`` (alternatives in order),
``Literal[...]``, `Path` (from a string), any other class by `isinstance`; a field typed as another dataclass
takes an instance, or a mapping that class checks when it is made from it. Numbers written as strings are read
as numbers for float fields: PyYAML follows YAML 1.1, which reads ``lr: 1e-3`` (no dot) as the string
``"1e-3"``; a bool is never an int. Errors name `where` and the field.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
from dataclasses import fields
from pathlib import PurePath
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from pkdkit.errors import ConfigError

@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """{field name: its type} of the dataclass `cls`, string annotations resolved to real types."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def type_name(tp: Any) -> str:
    """A type as written in an annotation: "float | None", "tuple[int, ...]", "DetectorSpec"."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None:
        return f"{type_name(origin)}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any) -> Any:
    """`value` as the type `tp`, converted where a plain value stands for it (a number written as a string
    for a float, a list for a tuple, a string for a path); raises TypeError."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for alt in args:
            try:
                return _convert(value, alt)
            except TypeError:
                pass
    elif tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[int, int]: one type per item
                if len(value) != len(args):
                    raise TypeError(f"expected {type_name(tp)} ({len(args)} items), found {value!r}")
                item_types = args
            else:
                item_types = (args[0] if args else Any,) * len(value)
            try:
                items = [_convert(v, a) for v, a in zip(value, item_types)]
                return tuple(items) if (origin or tp) is tuple else items
            except TypeError:
                pass
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            key, val = args or (Any, Any)
            try:
                return {_convert(k, key): _convert(v, val) for k, v in value.items()}
            except TypeError:
                pass
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, (tp, dict)):  # a mapping is checked by the class when it is made from it
            return value
    elif isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
    elif isinstance(value, origin or tp):
        return value
    raise TypeError(f"expected {type_name(tp)}, found {value!r} ({type(value).__name__})")


def value_type(tp: Any) -> Any:
    """The plain type of one value of the annotation `tp`, None left out: float for ``float | None``, tuple
    for ``tuple[float, ...]``, bool for ``bool | None`` (how a command-line option of that field reads it)."""
    args = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (Union, types.UnionType) else [tp]
    return get_origin(args[0]) or args[0]


def check_value(value: Any, tp: Any, where: str) -> Any:
    """`value` converted to the type `tp`, or ConfigError naming `where`."""
    try:
        return _convert(value, tp)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_keys(cls: type, values: Any, where: str) -> dict[str, Any]:
    """The one check that `values` is a mapping of fields the dataclass `cls` has (ConfigError naming `where`,
    the unknown keys and the known ones); returns it."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, found {values!r} ({type(values).__name__})")
    unknown = sorted(set(values) - set(field_types(cls)))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(field_types(cls))}")
    return values


def check_fields(cls: type, values: Any, where: str) -> dict[str, Any]:
    """Check a dict meant for the dataclass `cls`: `check_keys`, then each value of its field's type (converted
    as `check_value` does); errors read "<where>: <field>: expected ...". Fields typed as another dataclass
    take a mapping: that class checks it."""
    types_ = field_types(cls)
    return {name: check_value(value, types_[name], f"{where}: {name}")
            for name, value in check_keys(cls, values, where).items()}


def check_types(obj: Any, where: str) -> None:
    """Check (and convert in place, as `check_value` does) every field of the dataclass instance `obj`, for
    its `__post_init__`; errors read "<where> <field>: expected ..."."""
    for name, tp in field_types(type(obj)).items():
        object.__setattr__(obj, name, check_value(getattr(obj, name), tp, f"{where} {name}"))


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
