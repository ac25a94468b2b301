"""Typed configuration: frozen dataclasses that round-trip through plain JSON.

Every configuration object in DeepSeg is a frozen dataclass. ``to_dict`` turns one into JSON-ready
data; ``from_dict`` rebuilds it and refuses unknown keys (a typo in a model card must not be
silently ignored) while turning JSON lists back into the tuples the dataclass declares.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """Return a JSON-serialisable dict of a (nested) dataclass instance."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a dataclass instance, got {type(config).__name__}")
    return _to_jsonable(dataclasses.asdict(config))


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"cannot build {cls.__name__}",
            expected="a JSON object",
            found=type(data).__name__,
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} field(s) {unknown}",
            expected=f"one of {sorted(fields)}",
            found=str(unknown),
            hint="Check the spelling, or upgrade DeepSeg if the file was written by a newer version.",
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"cannot build {cls.__name__}: {exc}") from exc


def _coerce(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value)  # type: ignore[arg-type]
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(_coerce(a, v) for a, v in zip(args, value, strict=True))
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            if isinstance(value, (list, tuple)) and typing.get_origin(arg) is tuple:
                return _coerce(arg, value)
            if isinstance(value, dict) and dataclasses.is_dataclass(arg):
                return from_dict(arg, value)  # type: ignore[arg-type]
        return value
    return value


def save_json(config: Any, path: str | Path) -> None:
    """Write a dataclass as indented JSON, atomically (temporary name, then rename)."""
    from .fileutil import atomic_write_text

    atomic_write_text(Path(path), json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    """Read a dataclass written by :func:`save_json`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError("file not found", subject=path) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON ({exc.msg} at line {exc.lineno})", subject=path) from exc
    return from_dict(cls, data)
