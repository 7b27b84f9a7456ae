"""Typed configs from YAML: a file maps onto the config dataclass that lives next to its component.

A wrong field name or a value of the wrong type fails at load, naming the file, the field and what was expected.
A nested dataclass whose class has ``from_mapping(data, where)`` reads its section that way (``ModelConfig``: a
profile plus overrides), so a job config holds its typed ``model`` from the start.
Use: ``cfg = load_config("jobs/configs/data-tiny.yaml", MakeConfig)``.
"""

from __future__ import annotations

import copy
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
        if isinstance(value, typ):
            return value
        if hasattr(typ, "from_mapping"):  # a section read its own way (ModelConfig: a profile + overrides)
            return typ.from_mapping(value, where)
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


def load_config(path: str | Path, cls, overrides: dict | None = None, dotted: list[str] | tuple[str, ...] = ()):
    """``cls`` from a YAML file; ``overrides``: top-level fields replaced; ``dotted``: ``KEY=VALUE`` texts set into
    nested sections (``apply_overrides``)."""
    path = Path(path)
    data = {**read_yaml(path), **(overrides or {})}
    if dotted:
        data = apply_overrides(cls, data, list(dotted))
    return from_dict(cls, data, where=str(path))


def _options(typ) -> tuple:
    """The members of a union type (``int | None`` -> (int, NoneType)); any other type alone."""
    return typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)


def field_type(cls, path: str, where: str = "config"):
    """The type of dotted field ``path`` (``scale.num_workers``) in dataclass ``cls``; ConfigError naming the first
    part that is no field. Below an untyped mapping (a ``dict`` / ``Any`` field) every key is allowed: ``Any``."""
    typ = cls
    for i, part in enumerate(path.split(".")):
        options = [t for t in _options(typ) if t is not type(None)]
        typed = [t for t in options if dataclasses.is_dataclass(t)]
        if not typed:
            if any(t is typing.Any or typing.get_origin(t) is dict or t is dict for t in options):
                return typing.Any
            raise ConfigError(f"{where}: {'.'.join(path.split('.')[:i])} has no fields; {path!r} names none")
        names = [f.name for f in dataclasses.fields(typed[0])]
        if part not in names:
            raise ConfigError(f"{where}: {path!r}: {typed[0].__name__} has no field {part!r}; valid fields: "
                              f"{', '.join(names)}")
        typ = typing.get_type_hints(typed[0])[part]
    return typ


def parse_text(text: str, typ):
    """A value given as text on a command line, as field type ``typ`` wants it: kept as text where the type takes a
    string (``null`` / ``~`` still mean None where it takes None), else read as YAML (``4`` -> 4, ``[1, 2]``)."""
    options = _options(typ)
    if str in options:
        return None if text in ("null", "~") and type(None) in options else text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # the type check names the field and what it expected
    if isinstance(value, str) and float in options:  # YAML 1.1 reads 1e-3 (no dot) as text
        try:
            return float(value)
        except ValueError:
            pass
    return value


def text_fields(cls, data: dict) -> dict:
    """``data`` with its text values read as ``cls``'s field types want (what ``serve run app:build_app threads=4``
    or another command line hands over); values that are not text stay as they are."""
    hints = typing.get_type_hints(cls)
    return {k: parse_text(v, hints[k]) if isinstance(v, str) and k in hints else v for k, v in data.items()}


def apply_overrides(cls, data: dict, overrides: list[str], where: str = "command line") -> dict:
    """``data`` (a config mapping for ``cls``) with ``KEY=VALUE`` overrides set, KEY dotted into nested sections
    (``scale.num_workers=8``, ``model.policy.lora_rank=16``): each KEY checked against the dataclass tree, each VALUE
    read as its field's type (``parse_text``). The result still goes through ``from_dict``."""
    out = copy.deepcopy(data)
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{where}: override {text!r} is not KEY=VALUE (e.g. scale.num_workers=8)")
        typ = field_type(cls, key, where)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{where}: {key!r}: {part} is {child!r}, not a section")
            node = child
        node[parts[-1]] = parse_text(value, typ)
    return out
