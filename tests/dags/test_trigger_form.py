"""The trigger form agrees with the config: every Param against the config field it sets.

The expected bounds and enums are read from the pydantic field metadata (`Field(ge=...)`, `Literal`) and
the expected defaults from params.yaml as YAML, not from the JSON schema the form is generated from; and
at every bound the form and `load_config` must accept and refuse the same values.
"""

from __future__ import annotations

import typing
from typing import Any

import annotated_types as at
import pytest
import yaml

from tasks.core.config import DEFAULT_PARAMS, Config, load_config
from tasks.core.errors import UserError
from tasks.runners.airflow import PARAM_KEYS, trigger_params

SECTIONS = {"Model and data", "LoRA", "Training", "Regression gate", "Registry"}


@pytest.fixture(scope="module")
def params() -> dict[str, Any]:
    return trigger_params(load_config())


def _field(key: str) -> Any:
    *sections, name = key.split(".")
    model: Any = Config
    for part in sections:
        model = model.model_fields[part].annotation
    return model.model_fields[name]


def _bounds(key: str) -> dict[str, Any]:
    """The field's constraints, named as JSON schema names them."""
    names = {
        at.Ge: ("minimum", "ge"),
        at.Gt: ("exclusiveMinimum", "gt"),
        at.Le: ("maximum", "le"),
        at.Lt: ("exclusiveMaximum", "lt"),
    }
    out = {}
    for meta in _field(key).metadata:
        for kind, (name, attr) in names.items():
            if isinstance(meta, kind):
                out[name] = getattr(meta, attr)
        if isinstance(meta, at.MinLen):
            out["minLength" if _field(key).annotation is str else "minItems"] = meta.min_length
    return out


def _yaml_value(key: str) -> Any:
    node: Any = yaml.safe_load(DEFAULT_PARAMS.read_text(encoding="utf-8"))
    for part in key.split("."):
        node = node[part]
    return node


def _form_accepts(param: Any, value: Any) -> bool:
    from airflow.sdk.definitions.param import ParamValidationError

    try:
        param.resolve(value)
    except ParamValidationError:
        return False
    return True


def _config_accepts(key: str, value: Any) -> bool:
    try:
        load_config(overrides=[(key, value)])
    except UserError:
        return False
    return True


def _edge_values(bounds: dict[str, Any], integer: bool) -> list[Any]:
    """Values at and just beyond each bound."""
    step = 1 if integer else 1e-6
    values = []
    for name, bound in bounds.items():
        if name in ("minimum", "exclusiveMinimum"):
            values += [bound, bound - step, bound + step]
        elif name in ("maximum", "exclusiveMaximum"):
            values += [bound, bound + step, bound - step]
    return values


def test_every_form_field_is_a_config_field_with_a_title_and_a_section(params: dict[str, Any]) -> None:
    assert list(params) == list(PARAM_KEYS)
    for name, key in PARAM_KEYS.items():
        schema = params[name].schema
        assert schema["title"] == _field(key).title, (name, "title must be declared on the config field")
        assert schema["section"] in SECTIONS, name
        assert params[name].description == _field(key).description, name


def test_defaults_are_params_yaml(params: dict[str, Any]) -> None:
    for name, key in PARAM_KEYS.items():
        assert params[name].value == _yaml_value(key), name


def test_bounds_and_enums_are_the_config_fields(params: dict[str, Any]) -> None:
    keywords = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "minLength", "minItems")
    for name, key in PARAM_KEYS.items():
        schema = params[name].schema
        assert {k: schema[k] for k in keywords if k in schema} == _bounds(key), name
        annotation = _field(key).annotation
        if typing.get_origin(annotation) is typing.Literal:
            assert schema["enum"] == list(typing.get_args(annotation)), name
        else:
            assert "enum" not in schema, name


def test_form_and_config_accept_the_same_values_at_every_bound(params: dict[str, Any]) -> None:
    checked = 0
    for name, key in PARAM_KEYS.items():
        schema = params[name].schema
        values = _edge_values(_bounds(key), schema.get("type") == "integer")
        values += {"string": [""], "array": [[]]}.get(schema.get("type"), [])
        values += ["not-an-option"] if "enum" in schema else []
        for value in values:
            form, config = _form_accepts(params[name], value), _config_accepts(key, value)
            assert form == config, f"{name}={value!r}: form accepts {form}, config accepts {config}"
            checked += 1
    assert checked > 30


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("lora_dropout", 0.995, True),  # the form used to stop at 0.99 while the config allows < 1.0
        ("lora_dropout", 1.0, False),
        ("num_train_epochs", 150, True),  # the form used to cap epochs at 100; the config does not
        ("gate_max_regression", 1.5, False),  # metrics are in [0, 1]: the config now caps it as the form did
        ("gate_max_regression", 1.0, True),
    ],
)
def test_the_bounds_that_used_to_differ(
    params: dict[str, Any], name: str, value: Any, accepted: bool
) -> None:
    assert _form_accepts(params[name], value) is accepted
    assert _config_accepts(PARAM_KEYS[name], value) is accepted
