"""params.yaml -> one frozen, typed configuration.

Every stage reads its own section. Unknown keys, wrong types and out-of-range values are refused with
one line naming the key and what is allowed. Overrides come from `--set section.key=value` on the CLI,
`dvc exp run -S`, or Airflow trigger Params; all go through :func:`load_config`, so a value is checked
the same way wherever it comes from. The trigger form is generated from these models: its bounds are here.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from tasks.core.errors import UserError
from tasks.core.ops_config import LineageConfig, OrchestrateConfig, Section
from tasks.core.overrides import apply_overrides, read_params
from tasks.core.redact import redact

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout that holds this code


def _project_root() -> Path:
    """The project a command works on: $QA_LORA_ROOT; else the working directory when it holds params.yaml
    and dvc.yaml (`dvc repro` / `dvc exp run` run stages there, maybe in another clone or a temp workspace);
    else the checkout holding this code (an Airflow worker's working directory is arbitrary)."""
    env = os.environ.get("QA_LORA_ROOT")
    if env:
        return Path(env).resolve()
    cwd = Path.cwd()
    if (cwd / "params.yaml").is_file() and (cwd / "dvc.yaml").is_file():
        return cwd.resolve()
    return PACKAGE_ROOT


REPO_ROOT = _project_root()
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"

Policy = Literal["error", "drop"]


class DataPolicies(Section):
    """What each validation check does with an offending row: `error` stops, `drop` removes it."""

    blank: Policy = "drop"
    duplicate: Policy = "drop"
    near_duplicate: Policy = "drop"
    too_long: Policy = "drop"
    control_tokens: Policy = "drop"
    missing_eos: Policy = "error"


class DataConfig(Section):
    source: str = Field(
        "data/qa.jsonl",
        min_length=1,
        title="Q&A dataset",
        description="JSONL, CSV or Parquet file inside the allowed data roots (data.allowed_roots).",
    )
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    allowed_roots: tuple[str, ...] = ("data",)
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_salt: str = "qa-lora-v1"
    min_rows: int = Field(100, ge=1)
    max_rows: int = Field(1_000_000, ge=1)
    max_drop_fraction: float = Field(0.25, ge=0.0, le=1.0)
    max_row_bytes: int = Field(65_536, ge=1)
    near_duplicate_threshold: float = Field(0.9, gt=0.0, le=1.0)
    policies: DataPolicies = DataPolicies()
    dvc_remote: str = "dvc-remote"
    system_prompt: str | None = Field(
        None,
        title="System prompt",
        description="A system message for every row without one of its own (rendered by the base's chat template).",
    )


class TinyBaseConfig(Section):
    """Recipe for the embedded tiny Llama (built by `qa-lora base`)."""

    vocab_size: int = Field(4096, ge=256, le=65536)
    hidden_size: int = Field(192, ge=16)
    intermediate_size: int = Field(512, ge=16)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(512, ge=64)
    pretrain_steps: int = Field(600, ge=0)
    pretrain_batch_size: int = Field(8, ge=1)
    pretrain_seq_len: int = Field(128, ge=16)
    pretrain_learning_rate: float = Field(1e-3, gt=0.0)
    seed: int = 1234


class BaseConfig(Section):
    name_or_path: str = Field(
        "models/tiny-base",
        min_length=1,
        title="Base model",
        description="Local directory or hub id, e.g. meta-llama/Llama-2-7b-chat-hf (set base kind: hub).",
    )
    kind: Literal["tiny", "hub"] = Field(
        "tiny",
        title="Base kind",
        description="tiny: the embedded CPU model (built at the base model path if missing); hub: load as is.",
    )
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    tiny: TinyBaseConfig = TinyBaseConfig()


class PromptConfig(Section):
    """How rows become text: the base tokenizer's own chat template, or a built-in one by name."""

    template: Literal["auto", "llama2", "llama3", "chatml", "mistral"] = Field(
        "auto",
        title="Chat template",
        description="auto: the base tokenizer's own; a name: that built-in template (for a base without one).",
    )


class LoraSection(Section):
    r: int = Field(32, gt=0, le=1024, title="Rank r")
    alpha: int = Field(32, gt=0, title="Alpha", description="scale = alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, title="Dropout")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        min_length=1,
        title="Target modules",
        description="Module names to adapt, one per line in the trigger form, e.g. q_proj, v_proj.",
    )
    modules_to_save: tuple[str, ...] = Field(("embed_tokens",), title="Trained in full")
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("target_modules", "modules_to_save", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class TrainConfig(Section):
    num_train_epochs: float = Field(8.0, gt=0.0, title="Epochs")
    max_steps: int = Field(
        -1,
        ge=-1,
        title="Max steps",
        description="-1: train the epochs above; > 0: stop after this many optimizer steps.",
    )
    per_device_train_batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2.5e-3, gt=0.0, le=1.0, title="Learning rate")
    lr_scheduler_type: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr"
    ] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    group_by_length: bool = True
    max_length: int = Field(256, ge=8)
    optim: str = "adamw_torch"
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    num_processes: int = Field(
        1, ge=1, le=64, title="Processes (GPUs)", description="> 1 launches torchrun (DDP or FSDP)."
    )
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # Several nodes: torchrun's elastic agent on each, meeting at a c10d rendezvous (README, "More than one
    # node"). num_processes is per node; the endpoint is host:port, or else taken from the environment a
    # scheduler sets (PET_RDZV_ENDPOINT, MASTER_ADDR + MASTER_PORT).
    nnodes: int = Field(1, ge=1, le=256, title="Nodes")
    rdzv_endpoint: str | None = Field(None, pattern=r"^[A-Za-z0-9.\-\[\]:]+:\d+$")
    rdzv_timeout_s: int = Field(300, ge=10)  # how long agents wait for every node to (re)join
    max_restarts: int = Field(0, ge=0, le=100)  # worker-group restarts, from the last checkpoint
    # Replay against forgetting: blocks of general text (labels on every token) mixed into the SFT rows,
    # `replay_ratio` blocks per row; the text is `replay_source` (JSONL/Parquet, `text`), or for the tiny
    # base its pretraining documents (tasks/plumbing/general_text.py). 0: none.
    replay_ratio: float = Field(0.2, ge=0.0, le=4.0, title="Replay ratio")
    replay_source: str | None = None
    replay_block_tokens: int = Field(128, ge=8)  # tokens per replayed block (at most max_length)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    kernels: Literal["auto", "none", "liger", "compile"] = "auto"  # auto: measured on GPUs, none on CPU


# Per-row answer metrics that can be primary (higher is better); see tasks/metrics.py.
RowMetric = Literal["exact_match", "token_f1", "rouge_l"]


class EvalConfig(Section):
    max_rows: int = Field(200, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1)
    bootstrap_samples: int = Field(1000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    seed: int = 0
    primary_metrics: tuple[RowMetric, ...] = Field(("token_f1", "rouge_l"), min_length=1)
    cache_dir: str | None = ".cache/qa-lora/eval"  # per-model results, keyed by model, data and settings
    # The forgetting rule's held-out general text (gate.max_general_ppl_increase): a JSONL/Parquet file
    # with a `text` column; None: the tiny base's held-out pretraining documents (required for a hub base).
    general_source: str | None = None
    general_max_docs: int = Field(64, ge=1)
    general_max_tokens: int = Field(256, ge=8)
    # lm-evaluation-harness tasks run on base and candidate (the [harness] extra; plumbing/harness.py):
    # harness task names, paths to task YAMLs, or qa_lora_mc (multiple choice built from the eval rows)
    harness_tasks: tuple[str, ...] = ("qa_lora_mc",)
    harness_limit: int | None = Field(None, ge=1)  # documents per task; None: all


class GateConfig(Section):
    primary_metric: RowMetric = "token_f1"
    min_improvement: float = Field(
        0.0,
        title="Min improvement over base",
        description="Lower CI bound of candidate - base on the primary metric must exceed this.",
    )
    # Metrics are fractions in [0, 1]: a drop over 1 cannot happen, so a larger value is a typo (2 for 2%).
    max_regression: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        title="Max regression vs champion",
        description="Allowed drop vs the champion, per primary metric and per slice (1.0: never blocks).",
    )
    # mean: the observed drop decides; noninferiority: the CI's lower bound must stay above -max_regression
    regression_test: Literal["mean", "noninferiority"] = "mean"
    min_slice_size: int = Field(20, ge=1)
    min_eos_rate: float = Field(0.5, ge=0.0, le=1.0)
    max_empty_rate: float = Field(0.1, ge=0.0, le=1.0)
    # the most common (normalized) answer's share of the eval answers: above it the model has collapsed
    max_top_answer_share: float = Field(0.5, ge=0.0, le=1.0)
    # the candidate's perplexity on held-out general text over the base's, minus 1 (stages/evaluate/general.py);
    # None: no forgetting rule
    max_general_ppl_increase: float | None = Field(0.25, ge=0.0)
    # the largest drop of a harness task's headline metric, candidate vs base (stages/evaluate/harness.py);
    # None: the tasks are reported, not gated
    max_harness_regression: float | None = Field(0.05, ge=0.0)  # in the metric's units (acc: 0..1)
    # serving cost vs the champion, measured side by side at export (stages/export/serving_gate.py)
    max_latency_regression: float = Field(0.5, ge=0.0)  # champion / candidate tokens/s - 1, batch 1
    max_size_regression: float = Field(0.1, ge=0.0)  # candidate / champion export bytes - 1
    on_fail: Literal["skip", "fail"] = Field(
        "skip",
        title="When the gate fails",
        description="skip: export/register are skipped with the reason logged; fail: the run fails.",
    )


class ExportConfig(Section):
    opset: int = Field(18, ge=14)
    logits_atol: float = Field(1e-4, gt=0.0)
    parity_prompts: int = Field(8, ge=1)
    parity_new_tokens: int = Field(16, ge=1)
    variants: tuple[Literal["fp16", "int8"], ...] = ()
    provider: Literal["auto", "MIGraphX", "ROCM", "CUDA", "CPU"] = "auto"
    # a GPU provider that does not load fails the stage; true: warn, run on the CPU, record it
    allow_cpu_fallback: bool = False
    # adapter-on-base vs merged: (W+BA)x and Wx+B(Ax) round differently, so not 0
    merge_atol: float = Field(1e-3, gt=0.0)
    # fp16/int8 vs fp32: share of (teacher-forced) positions with the same argmax token
    variant_min_top1: float = Field(0.9, ge=0.0, le=1.0)
    serving_prompts: int = Field(16, ge=1)  # eval questions per serving-cost measurement (fresh process)
    serving_repeats: int = Field(2, ge=1)  # measurements per side, candidate and champion taking turns
    # the model card's license (a Hugging Face license id); None: the base's card says, else "other"
    license: str | None = None


class RegisterConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    # Artifacts of a database store: None = mlartifacts/ beside a SQLite file; s3://bucket/prefix (the
    # credentials come from AWS_* variables, never from here). A tracking server decides for itself.
    artifact_location: str | None = None
    experiment: str = "qa-lora"
    model_name: str = "qa-lora"
    promote: bool = Field(True, title="Promote to champion if the gate passes")
    require_approval: bool = Field(False, title="Require human approval before promotion")

    @field_validator("artifact_location")
    @classmethod
    def _artifact_location(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit

        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("s3", "gs", "file"):
            raise ValueError("expected s3://bucket/prefix, gs://bucket/prefix or file:///absolute/path")
        if parts.username or parts.password:
            raise ValueError(
                "credentials do not belong in params: use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "(or the cloud's own variables)"
            )
        return value


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # "cuda" also addresses ROCm GPUs
    run_dir: str = "runs/local"
    num_threads: int = Field(0, ge=0)  # 0: let torch decide
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    keep_runs: int | None = Field(20, ge=1)  # retention: run directories kept (protected count); None: all
    keep_gb: float | None = Field(None, gt=0.0)  # retention: a disk budget for the runs root
    busy_hours: float = Field(24.0, gt=0.0)  # retention: a run written to this recently is in progress


# `register` is a stage name; pydantic warns that it shadows ABCMeta.register, which nobody calls here.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Config(Section):
    data: DataConfig = DataConfig()
    base: BaseConfig = BaseConfig()
    prompt: PromptConfig = PromptConfig()
    lora: LoraSection = LoraSection()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    export: ExportConfig = ExportConfig()
    register: RegisterConfig = RegisterConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    orchestrate: OrchestrateConfig = OrchestrateConfig()
    lineage: LineageConfig = LineageConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-safe dict (tuples become lists)."""
        return json.loads(self.model_dump_json())

    def params_hash(self) -> str:
        """Stable short hash of the effective config, for lineage tags."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def resolve(self, path: str | Path) -> Path:
        """A config path (relative paths are relative to the repository root) as an absolute path."""
        p = Path(path)
        return p if p.is_absolute() else REPO_ROOT / p


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    got = error.get("input")
    if kind == "extra_forbidden":
        section = model
        for part in error["loc"][:-1]:
            field = section.model_fields.get(str(part))
            section = field.annotation if field is not None else None  # type: ignore[assignment]
            if not (isinstance(section, type) and issubclass(section, BaseModel)):
                break
        allowed = ", ".join(section.model_fields) if isinstance(section, type) else "?"
        return f"unknown key {loc!r}; allowed keys here: {allowed}"
    return redact(f"{loc}: {error['msg'].lower()} (got {got!r})")  # a refused URI may carry a password


def load_config(
    params: str | Path | None = None,
    overrides: Iterable[str | tuple[str, Any]] = (),
) -> Config:
    """Load params.yaml (or an overlay that `extends` it), apply overrides, validate.

    Args:
        params: path to a params file; defaults to the repository's params.yaml.
        overrides: `section.key=value` strings or (dotted key, value) pairs, applied in order.

    Returns:
        The frozen configuration.

    Raises:
        UserError: one line naming the file, the key and what is allowed.
    """
    path = Path(params) if params is not None else DEFAULT_PARAMS
    raw = apply_overrides(read_params(path), overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
        raise UserError(f"{path}: {_describe(first, Config)}{suffix}") from None


def save_config(cfg: Config, path: Path) -> Path:
    """Write the effective config (what a run actually used) as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    from tasks.core.redact import redact_obj

    # credentials in a URI (tracking URI, DVC remote) must not reach a file every reader of the run sees
    text = yaml.safe_dump(redact_obj(cfg.to_dict()), sort_keys=False)
    path.write_text(f"# effective config, params hash {cfg.params_hash()}\n{text}", encoding="utf-8")
    return path
