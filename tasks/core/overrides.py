"""Params files before validation: `extends` chains merged, `section.key=value` overrides applied.

tasks/core/config.py validates the result; this module only reads and merges raw YAML.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tasks.core.errors import UserError


def read_params(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A params file as a raw dict, merged over the file it `extends` (recursively).

    Raises:
        UserError: a missing file, invalid YAML (line named), not a mapping, or an `extends` cycle.
    """
    if not path.is_file():
        raise UserError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    parent_path = (path.parent / str(parent)).resolve()
    if parent_path in seen:
        raise UserError(f"{path}: 'extends' forms a cycle through {parent_path}")
    return _deep_merge(read_params(parent_path, (*seen, path.resolve())), raw)


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], typed value). Values are parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected section.key=value")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise UserError(f"--set {item!r}: key must name a section and a key, e.g. train.learning_rate")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str | tuple[str, Any]]) -> dict[str, Any]:
    """Apply `section.key=value` strings (or (dotted key, value) pairs) to a raw params dict."""
    out = _deep_merge({}, raw)
    for item in overrides:
        if isinstance(item, str):
            parts, value = parse_override(item)
        else:
            parts, value = item[0].split("."), item[1]
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UserError(f"--set {'.'.join(parts)}: {part!r} is a value, not a section")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return out
