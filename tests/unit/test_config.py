"""params.yaml -> frozen typed config: good file, unknown keys, wrong types, ranges, overrides, presets."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from tasks.core.config import DEFAULT_PARAMS, Config, load_config, save_config
from tasks.core.errors import UserError
from tasks.core.overrides import parse_override

STABLE_KEYS = [
    "data.source",
    "train.max_steps",
    "train.num_train_epochs",
    "train.learning_rate",
    "train.num_processes",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "lora.modules_to_save",
    "register.tracking_uri",
    "runtime.device",
]


def _write(tmp_path: Path, text: str, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_repository_params_load_and_are_frozen() -> None:
    import yaml

    cfg = load_config()
    listed = yaml.safe_load(DEFAULT_PARAMS.read_text(encoding="utf-8"))["lora"]["target_modules"]
    assert cfg.lora.target_modules == tuple(listed)  # a YAML list becomes a (frozen) tuple
    assert cfg.train.max_steps == -1
    with pytest.raises(pydantic.ValidationError):
        cfg.train.learning_rate = 1.0  # type: ignore[misc]


def test_the_code_defaults_are_params_yaml_value_by_value() -> None:
    # params.yaml is the one source of truth a user reads; the models' defaults (what an older params
    # file or a preset that omits a key gets) must say the same, value by value.
    from tasks.core.config import DEFAULT_PARAMS, Config

    assert load_config(DEFAULT_PARAMS).to_dict() == Config().to_dict()


def test_params_file_sets_every_key_explicitly() -> None:
    """params.yaml is the documentation: it spells out every key the code knows (no hidden defaults)."""
    import yaml

    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())

    def keys(model: type[pydantic.BaseModel], node: dict, prefix: str = "") -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            sub = field.annotation
            if name not in node:
                missing.append(prefix + name)
            elif isinstance(sub, type) and issubclass(sub, pydantic.BaseModel):
                missing += keys(sub, node[name], f"{prefix}{name}.")
        return missing

    assert keys(Config, raw) == []


@pytest.mark.parametrize("key", STABLE_KEYS)
def test_stable_key_names_exist(key: str) -> None:
    section, name = key.split(".")
    assert name in type(getattr(load_config(), section)).model_fields


def test_unknown_key_names_key_and_allowed(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  learning_rat: 0.1\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    msg = str(err.value)
    assert "unknown key 'train.learning_rat'" in msg
    assert "learning_rate" in msg  # the allowed keys are listed
    assert str(path) in msg
    assert "\n" not in msg


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown key 'trian'; allowed keys here: data, base"):
        load_config(_write(tmp_path, "trian: {}\n"))


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"lora\.r: .*integer.*\(got 'eight'\)"):
        load_config(_write(tmp_path, "lora:\n  r: eight\n"))


def test_out_of_range_and_enum(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"train\.learning_rate: input should be greater than 0"):
        load_config(overrides=["train.learning_rate=0"])
    with pytest.raises(UserError, match=r"runtime\.device: input should be 'auto', 'cpu' or 'cuda'"):
        load_config(overrides=["runtime.device=tpu"])
    with pytest.raises(UserError, match=r"lora\.r: input should be greater than 0"):
        load_config(overrides=["lora.r=0"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (("gate.max_regression", 1.5), r"gate\.max_regression: input should be less than or equal to 1"),
        (("data.source", ""), r"data\.source: string should have at least 1 character"),
        (("base.name_or_path", ""), r"base\.name_or_path: string should have at least 1 character"),
        (("lora.target_modules", []), r"lora\.target_modules: .*at least 1 item"),
        (("lora.dropout", 1.0), r"lora\.dropout: input should be less than 1"),
    ],
)
def test_bounds_the_trigger_form_shares(override: tuple[str, object], message: str) -> None:
    """The bounds the trigger form is generated from (tests/dags/test_trigger_form.py) hold for every source."""
    with pytest.raises(UserError, match=message):
        load_config(overrides=[override])


def test_form_fields_declare_a_title_once() -> None:
    """Titles and descriptions live on the config fields; the trigger form shows them as they are."""
    from tasks.core.config import GateConfig, LoraSection

    assert LoraSection.model_fields["r"].title == "Rank r"
    assert GateConfig.model_json_schema()["properties"]["on_fail"]["enum"] == ["skip", "fail"]
    assert GateConfig.model_fields["max_regression"].description


def test_overrides_are_typed_like_the_file() -> None:
    cfg = load_config(
        overrides=[
            "train.max_steps=20",
            "train.learning_rate=1e-3",
            "lora.target_modules=[q_proj, k_proj, v_proj]",
            "register.promote=false",
            ("lora.dropout", 0.2),
        ]
    )
    assert cfg.train.max_steps == 20 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj")
    assert cfg.register.promote is False
    assert cfg.lora.dropout == pytest.approx(0.2)


def test_single_target_module_string_becomes_tuple() -> None:
    assert load_config(overrides=["lora.target_modules=q_proj"]).lora.target_modules == ("q_proj",)


@pytest.mark.parametrize("bad", ["train", "=3", "train=3", "train..x=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(UserError, match="--set"):
        parse_override(bad)


def test_override_into_a_value_is_refused() -> None:
    with pytest.raises(UserError, match="is a value, not a section"):
        load_config(overrides=["train.max_steps.x=1"])


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"params.yaml: line 3 is not valid YAML \(expected"):
        load_config(_write(tmp_path, "train:\n  max_steps: [1\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")


def test_extends_overlay_and_cycle(tmp_path: Path) -> None:
    base = _write(tmp_path, "train:\n  max_steps: 7\nlora:\n  r: 4\n", "base.yaml")
    over = _write(tmp_path, f"extends: {base.name}\nlora:\n  r: 16\n", "over.yaml")
    cfg = load_config(over)
    assert (cfg.train.max_steps, cfg.lora.r) == (7, 16)
    _write(tmp_path, "extends: b.yaml\n", "a.yaml")
    _write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_reference_preset_is_the_walkthrough(repo_root: Path) -> None:
    cfg = load_config(repo_root / "params" / "llama2-7b-mi300x.yaml")
    assert cfg.base.name_or_path == "meta-llama/Llama-2-7b-chat-hf" and cfg.base.kind == "hub"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16, 0.1)
    assert cfg.lora.target_modules == ("q_proj", "v_proj") and cfg.lora.bias == "none"
    t = cfg.train
    assert (t.num_train_epochs, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (1, 4, 1)
    assert t.learning_rate == pytest.approx(4e-5) and t.lr_scheduler_type == "constant"
    assert (t.warmup_ratio, t.weight_decay, t.max_grad_norm) == (0.03, 0.001, 0.3)
    assert t.group_by_length is True and t.precision == "bf16"
    # what the preset does not set comes from params.yaml
    assert cfg.data.source == load_config().data.source


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config(overrides=["train.max_steps=5"])
    path = save_config(cfg, tmp_path / "params.effective.yaml")
    again = load_config(path)
    assert again == cfg and again.params_hash() == cfg.params_hash()
    assert load_config().params_hash() != cfg.params_hash()


def test_project_root_follows_the_working_checkout(tmp_path: Path, repo_root: Path) -> None:
    """`dvc repro` in another clone (or dvc exp's temp workspace) must use that clone's params and data."""
    import os
    import subprocess
    import sys

    code = "from tasks.core.config import REPO_ROOT, DEFAULT_PARAMS; print(REPO_ROOT); print(DEFAULT_PARAMS)"
    env = {k: v for k, v in os.environ.items() if k != "QA_LORA_ROOT"}
    env["PYTHONPATH"] = str(repo_root)

    def root(cwd: Path, **extra: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=cwd,
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.split()

    assert root(tmp_path) == [str(repo_root), str(repo_root / "params.yaml")]  # not a project: the code's
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert root(tmp_path) == [str(tmp_path.resolve()), str(tmp_path.resolve() / "params.yaml")]
    assert root(tmp_path, QA_LORA_ROOT=str(repo_root))[0] == str(repo_root)


def test_artifact_location_takes_a_bucket_never_its_credentials() -> None:
    assert load_config(overrides=["register.artifact_location=s3://bucket/mlflow"]).register.artifact_location
    with pytest.raises(UserError, match=r"register\.artifact_location: .*credentials do not belong") as err:
        load_config(overrides=["register.artifact_location=s3://AKIAKEY:s3cr3t@bucket/mlflow"])
    assert "s3cr3t" not in str(err.value)
    with pytest.raises(UserError, match=r"register\.artifact_location: .*expected s3://bucket/prefix"):
        load_config(overrides=["register.artifact_location=ftp://host/x"])
