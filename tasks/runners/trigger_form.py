"""The Airflow trigger form, generated from the config schema: bounds, enums and titles live in one place.

Each form field sets one config key (the DAG's `PARAM_KEYS`). Its Param is the JSON schema pydantic
derives for that field (`type`, `minimum`/`maximum`, `exclusiveMinimum`/`exclusiveMaximum`, `enum`,
`minLength`, `minItems`, `items`, `title`, `description`: all declared with `Field(...)` and `Literal`
in tasks/core/config.py), with params.yaml's value as the default and a form section taken from the
key's config section. A bound changed in the config is therefore the form's bound too; the form can
never accept a value that `load_config` then refuses, nor refuse one it accepts.

Imports stay light (pydantic, no Airflow at module level): the DAG processor parses the DAG often.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from tasks.core.config import Config

# Config section -> the form section it appears under (the form's order follows PARAM_KEYS).
SECTIONS: dict[str, str] = {
    "base": "Model and data",
    "prompt": "Model and data",
    "data": "Model and data",
    "lora": "LoRA",
    "train": "Training",
    "gate": "Regression gate",
    "register": "Registry",
}
# JSON-schema keywords a Param takes from the field's schema (pydantic's "default" is the model's
# default, not params.yaml's, so the value comes from the loaded config instead).
SCHEMA_KEYWORDS = (
    "type",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "items",
    "anyOf",
    "title",
)


def field_schema(key: str) -> dict[str, Any]:
    """The JSON schema of one config field, e.g. `lora.dropout`, as pydantic derives it.

    Raises:
        KeyError: `key` does not name a field of the config.
    """
    *sections, name = key.split(".")
    model: type[BaseModel] = Config
    for part in sections:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise KeyError(f"{key}: {part!r} is not a config section")
        model = annotation
    properties = _properties(model)
    if name not in properties:
        raise KeyError(f"{key}: no such config field")
    return copy.deepcopy(properties[name])


@functools.cache
def _properties(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()["properties"]


def config_value(cfg: Config, key: str) -> Any:
    """The value of a dotted config key in `cfg`, JSON-shaped (tuples become lists)."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return list(node) if isinstance(node, tuple) else node


def param_spec(cfg: Config, key: str) -> dict[str, Any]:
    """The keyword arguments of one form field's Param: default, schema keywords, description, section.

    Args:
        cfg: the defaults (params.yaml).
        key: the dotted config key the field sets.
    """
    schema = field_schema(key)
    spec = {k: schema[k] for k in SCHEMA_KEYWORDS if k in schema}
    if "enum" in spec and "type" not in spec:
        spec["type"] = "string"
    spec["default"] = config_value(cfg, key)
    spec["description"] = schema.get("description")
    spec["section"] = SECTIONS[key.split(".")[0]]
    return spec


def form_params(cfg: Config, fields: Mapping[str, str]) -> dict[str, Any]:
    """The DAG's Params: form field name -> airflow.sdk.Param, built from the config schema.

    Args:
        cfg: the defaults (params.yaml, or $QA_LORA_PARAMS).
        fields: form field name -> the dotted config key it sets (the DAG's PARAM_KEYS).

    Returns:
        name -> Param, in the order of `fields`.
    """
    from airflow.sdk import Param

    params = {}
    for name, key in fields.items():
        spec = param_spec(cfg, key)
        params[name] = Param(spec.pop("default"), description=spec.pop("description"), **spec)
    return params
