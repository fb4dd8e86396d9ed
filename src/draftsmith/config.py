"""Typed configuration shared by every stage.

Each component declares its own config class next to itself (a `StrictConfig` subclass); this
module only provides the strict base class, YAML recipes and `--set a.b=value` overrides.
Unknown keys never pass silently: the error names the key and lists the valid ones.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from draftsmith.utils.io import InputError

C = TypeVar("C", bound="StrictConfig")


class StrictConfig(BaseModel):
    """Base of every config: unknown keys fail, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def valid_keys(cls: type[BaseModel]) -> list[str]:
    return sorted(cls.model_fields)


FREE_FORM = object()  # marks a `dict[str, Any]` field (e.g. a recipe's drafter-specific `model`)


def _nested_class(cls: type[BaseModel], key: str):
    annotation = cls.model_fields[key].annotation
    arms = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(arms) == 1:
        annotation = arms[0]  # an optional section (`X | None`) is the section X
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if annotation is dict or getattr(annotation, "__origin__", None) is dict:
        return FREE_FORM
    return None


def check_keys(cls: type[BaseModel], data: dict, where: str, prefix: str = "") -> None:
    """Raise InputError for the first key of `data` that `cls` does not declare (recursively)."""
    for key, value in data.items():
        if key not in cls.model_fields:
            raise InputError(
                f"{where}: unknown key '{prefix}{key}'; valid keys here: {', '.join(valid_keys(cls))}"
            )
        sub = _nested_class(cls, key)
        if sub is not None and sub is not FREE_FORM and isinstance(value, dict):
            check_keys(sub, value, where, prefix=f"{prefix}{key}.")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so 3, 1e-4, true, [1,2] get their types)."""
    if "=" not in item:
        raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise InputError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise InputError(f"--set {item!r}: value is not valid YAML ({e})") from None
    return path, value


def apply_overrides(cls: type[BaseModel], data: dict, overrides: list[str]) -> dict:
    """Return a copy of `data` with every `a.b=value` applied; unknown key paths fail."""
    data = _deep_copy(data)
    for item in overrides:
        path, value = parse_override(item)
        node, node_cls = data, cls
        for i, key in enumerate(path):
            if node_cls is FREE_FORM:  # a dict field: its keys are checked by its owner
                pass
            elif node_cls is None or key not in node_cls.model_fields:
                keys = ", ".join(valid_keys(node_cls)) if node_cls else "(not a section)"
                raise InputError(
                    f"--set {item}: unknown key '{'.'.join(path[: i + 1])}'; valid keys here: {keys}"
                )
            if i == len(path) - 1:
                node[key] = value
            else:
                node = node.setdefault(key, {})
                node_cls = FREE_FORM if node_cls is FREE_FORM else _nested_class(node_cls, key)
    return data


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: recipe/config file not found") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def build_config(cls: type[C], data: dict, overrides: list[str] = (), where: str = "config") -> C:
    """Validate `data` (+ overrides) into `cls`, with errors that name the key and the source."""
    check_keys(cls, data, where)
    data = apply_overrides(cls, data, list(overrides))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        set_by = {".".join(parse_override(item)[0]): item for item in overrides}
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            source = next((f"--set {item}" for key, item in set_by.items()
                           if loc == key or loc.startswith(key + ".")), where)
            lines.append(f"{source}: {loc}: {err['msg']} (got {err.get('input')!r})")
        raise InputError(lines[0] if len(lines) == 1 else "invalid config\n  " + "\n  ".join(lines)) from None


def load_config(cls: type[C], path: str | os.PathLike | None, overrides: list[str] = ()) -> C:
    data = load_yaml(path) if path else {}
    return build_config(cls, data, overrides, where=str(path) if path else "config")
