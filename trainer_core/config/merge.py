"""Merging: defaults <- YAML (``--config``) <- dotted overrides (``train.lr=1e-4``). Unknown keys and values of the
wrong type fail loudly here; ``to_yaml`` and ``field_docs`` (``--help-config``) read the same tree back out."""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer_core.config.schema import (
    Config,
    ConfigError,
)

# ----------------------------------------------------------------------------------------------------------------
# merging


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value converted to the annotated type tp, or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for arm in inner:  # e.g. Union[int, Literal["auto"]]: the first arm that takes the value
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        names = [" or ".join(map(repr, typing.get_args(a))) if typing.get_origin(a) is Literal
                 else {int: "an integer", float: "a number", str: "a string"}.get(a, str(a)) for a in inner]
        raise ConfigError(f"{key}: expected {' or '.join(names)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML reads on/off/true/false as booleans
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(prefix + n for n in names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of {key}.* keys, got {v!r}")
            _apply(cur, v, prefix=f"{key}.")
        elif isinstance(cur, dict) and isinstance(v, dict):
            setattr(obj, k, {**cur, **v})  # model.random_config.hidden_size=64 changes one entry
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.lr=1e-4'`` -> ``('train.lr', 1e-4)``; the value is read as YAML (``null``, ``[a,b]``, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def nest(dotted: dict) -> dict:
    """``{'train.lr': 1}`` -> ``{'train': {'lr': 1}}``."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def _resolve_relative_paths(raw: dict, base: Path) -> None:
    for section, key in (("data", "path"), ("data", "extra_train_path"), ("train", "soft_labels")):
        part = raw.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str) and part[key]:
            p = Path(part[key]).expanduser()
            if not p.is_absolute():
                part[key] = str((base / p).resolve())


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file <- overrides. Overrides are 'a.b=v' strings or a dict of dotted keys."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections")
        _resolve_relative_paths(raw, path.resolve().parent)
        try:
            _apply(cfg, raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if overrides:
        dotted = dict(parse_override(o) for o in overrides) if isinstance(overrides, list) else dict(overrides)
        nested = nest(dotted)
        _resolve_relative_paths(nested, Path.cwd())
        _apply(cfg, nested)
    return cfg


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    _apply(cfg, d)
    return cfg


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    """A copy of ``cfg`` with dotted overrides (``{'train.lr': 1e-4}``) merged in exactly as CLI overrides are: unknown
    keys and wrong types raise ConfigError. Used by sweeps, whose trials are such overrides of one base config."""
    out = copy.deepcopy(cfg)
    _apply(out, nest(dict(overrides)))
    return out


def get_value(cfg: Config, key: str) -> Any:
    """The value at a dotted key (``'lora.r'``); KeyError if there is none."""
    node: Any = cfg
    for part in key.split("."):
        if dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(key)
    return node


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def field_docs() -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every leaf field, for ``--help-config``."""
    out = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", f.metadata.get("doc", ""), v))

    walk(Config(), "")
    return out
