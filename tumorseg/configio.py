"""Load TOML into frozen dataclasses, with errors that name the key and suggest the right one.

One loader serves pipeline files and model cards: each dataclass declares its fields with type
hints and defaults, and validates its values in ``__post_init__`` by raising ``ValueError``.
"""
from __future__ import annotations

import copyreg
import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

# Loaded mappings are read-only proxies; let them pickle as the dicts they wrap, so that a
# configuration can travel to worker processes (tumorseg batch --workers).
def _read_only(mapping: dict) -> Mapping:
    return types.MappingProxyType(mapping)


copyreg.pickle(types.MappingProxyType, lambda proxy: (_read_only, (dict(proxy),)))

T = TypeVar("T")


def read_toml(path: Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error("file not found", path) from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"not valid TOML: {e}", path) from None
    except UnicodeDecodeError as e:  # TOML is UTF-8; a Latin-1 or UTF-16 file fails here
        raise error(f"not valid TOML: not UTF-8 text (byte {e.start}); save the file as UTF-8", path) from None
    except OSError as e:
        raise error(f"cannot read the file ({e.strerror})", path) from None


def from_dict(cls: type[T], data: Any, where: str, error: type[Exception] = ConfigError) -> T:
    """Build dataclass ``cls`` from ``data`` (nested mappings from TOML), validating as it goes.

    ``where`` names the file and table in messages (``pipelines/default.toml [inference]``).
    """
    if not isinstance(data, Mapping):
        raise error(f"{where}: expected a table, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise error(f"{where}: unknown key {key!r}{hint}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{where} {name}", error)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise error(f"{where}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise error(f"{where}: {e}") from None


def _convert(hint: Any, value: Any, where: str, error: type[Exception]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{where} ->", error)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where, error)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where, error) for v in value)
        if len(value) != len(args):
            raise error(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_convert(a, v, where, error) for a, v in zip(args, value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise error(f"{where}: expected a table, got {value!r}")
        key_t, val_t = args
        return types.MappingProxyType(
            {str(k): _convert(val_t, v, f"{where}.{k}", error) for k, v in value.items()}
        )
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise error(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {hint!r} at {where}")  # a bug, not user input


def to_dict(obj: Any) -> Any:
    """Plain TOML-writable data from a (nested) dataclass; None values are left out."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: to_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if getattr(obj, f.name) is not None
        }
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj
