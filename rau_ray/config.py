"""Typed configs from YAML: a file maps onto the config dataclass that lives next to its component.

A wrong field name or a value of the wrong type fails at load, naming the file, the field and what was expected.
Use: ``cfg = load_config("jobs/configs/data-tiny.yaml", MakeConfig)``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from rau_ray.errors import ConfigError


def _check(value, typ, where: str):
    origin = typing.get_origin(typ)
    if typ is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(typ):
            try:
                return _check(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {typ}")
    if typ is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if dataclasses.is_dataclass(typ):
        return from_dict(typ, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(typ)
        item_type = args[0] if args else typing.Any
        items = [_check(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float, str, bool) and (not isinstance(value, typ) or (typ is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def from_dict(cls, data, where: str = "config"):
    """Build dataclass ``cls`` from a mapping; unknown or ill-typed fields raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
                          f"valid fields: {', '.join(fields)}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {', '.join(missing)} for {cls.__name__}")
    kwargs = {k: _check(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def read_yaml(path: str | Path, missing: str = "config file not found") -> dict:
    """A YAML mapping from ``path``; a missing file, bad YAML or a non-mapping is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{missing}: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return data


def load_config(path: str | Path, cls, overrides: dict | None = None):
    path = Path(path)
    data = read_yaml(path)
    return from_dict(cls, {**data, **(overrides or {})}, where=str(path))
