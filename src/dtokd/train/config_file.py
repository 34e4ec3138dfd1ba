"""Reading config files: YAML as configs should mean it (a key given twice, an integer in YAML
1.1's octal, hex or base-60 form refused; ``1e-3`` a number), ``base:`` chains, ``key=value``
overrides, and a mapping read into typed dataclasses (:func:`from_dict`), with errors that name
the key, the value and what is allowed. What the settings are: :mod:`dtokd.train.config`."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key or value that is not allowed."""


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def read_config_file(path: Path, sections: Sequence[str] = (), _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a config file with its ``base:`` chain resolved: the file's keys laid over
    its base's, key by key within ``sections`` (see :func:`dtokd.train.config.load_config`)."""
    if not path.is_file():
        where = f" (the base of {str(_seen[-1])!r})" if _seen else ""
        raise ConfigError(f"config file {str(path)!r}{where} does not exist")
    try:
        raw = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_one_line(error)}") from None
    if raw is None:
        raise ConfigError(f"config file {str(path)!r} is empty: it must hold a mapping of settings")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of settings at the top level, "
            f"got {type(raw).__name__} {raw!r}"
        )
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"{str(path)!r}: base={base!r} must be the path of another config file, relative to this one's folder"
        )
    base_path = (path.parent / base).resolve()
    chain = (*_seen, path.resolve())
    if base_path in chain:
        raise ConfigError(f"{str(path)!r}: base={base!r} makes a cycle: {' -> '.join(map(str, (*chain, base_path)))}")
    merged = read_config_file(base_path, sections, chain)
    for key, value in raw.items():
        if key in sections and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def apply_override(raw: dict[str, Any], item: str, sections: Sequence[str] = ()) -> None:
    """``a.b.c=value`` (value parsed as YAML: numbers, booleans, null, lists, mappings); a mapping
    given to one of ``sections`` is merged into it key by key."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.1)")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key segment")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    try:
        value = parse_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({_one_line(error)}); quote lists and "
            "mappings, e.g. 'optim.milestones=[150, 180]'"
        ) from None
    last = parts[-1]
    if len(parts) == 1 and last in sections and isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = {**node[last], **value}  # a section is merged key by key, as over a base:
    else:
        node[last] = value


class _StrictLoader(yaml.SafeLoader):
    """YAML as configs should mean it: a key given twice in one mapping is an error (PyYAML keeps
    the last silently; merge keys ``<<`` may still be overridden), and integers are decimal
    (YAML 1.1 reads ``010`` as 8, ``0x1F`` as 31 and ``1:30`` as 90)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in lines:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (lines {lines[key]} and {line}): keep one",
                    key_node.start_mark,
                )
            lines[key] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = str(self.construct_scalar(node))
        if not _DECIMAL.fullmatch(text):
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{text!r} is an integer in YAML 1.1's octal, hex, binary or base-60 form: write it in "
                "decimal (or quote it for a string)",
                node.start_mark,
            )
        return int(text.replace("_", ""))


_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9_]*)")
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
# YAML 1.1 reads 1e-3 (no dot) as a string, YAML 1.2 as a number: a number, wherever it is written
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _SCIENTIFIC, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """A YAML document read by :class:`_StrictLoader` (None for an empty one)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def from_dict(cls: Any, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {[_join(where, k) for k in unknown]}; valid keys here: {names}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ConfigError(f"missing key(s) {[_join(where, k) for k in missing]}; required here: {required}")
    values = {}
    for name in names:
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], _join(where, name))
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: {value!r} is not allowed")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is Literal:
        if value in args and isinstance(value, str):
            return value
        raise ConfigError(f"{where}={value!r} is not allowed; use one of {list(args)}")
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be of type {getattr(hint, '__name__', hint)}, got {value!r}")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
