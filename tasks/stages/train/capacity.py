"""What a training would take on the GPU node it is meant for, before any weight is downloaded.

`qa-lora info --params P` prints it: the base's parameter count and the LoRA's (the model built on the
meta device from its config), and the device plan's memory estimate per GPU on an AMD Instinct MI300X
(192 GB HBM3) with the preset's processes, precision and batch, with what to change when it does not fit.
The base's config comes from a local model directory, else from `models/recipes/<model>.config.json`
(a hub model's config.json, shipped: no network), else from the hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.core.config import PACKAGE_ROOT, Config
from tasks.core.errors import UserError
from tasks.plumbing.loading import BaseRef, resolve_base
from tasks.stages.train.model import load_model_config, model_facts

RECIPES = PACKAGE_ROOT / "models" / "recipes"
MI300X = "AMD Instinct MI300X"
MI300X_BYTES = 192 * 10**9  # HBM3 per GPU


def recipe_path(name_or_path: str) -> Path:
    """Where the shipped config of a hub model lies: models/recipes/<repo name, lower case>.config.json."""
    return RECIPES / f"{name_or_path.rstrip('/').rsplit('/', 1)[-1].lower()}.config.json"


def base_model_config(cfg: Config) -> tuple[Any, str]:
    """(the base's transformers config, where it was read from).

    Raises:
        UserError: a hub base with no shipped recipe whose config cannot be fetched (offline).
    """
    from transformers import AutoConfig

    recipe = recipe_path(cfg.base.name_or_path)
    if cfg.base.kind == "hub" and not cfg.resolve(cfg.base.name_or_path).is_dir() and recipe.is_file():
        arch = {k: v for k, v in json.loads(recipe.read_text(encoding="utf-8")).items() if k != "_comment"}
        return AutoConfig.for_model(arch.pop("model_type"), **arch), str(recipe.relative_to(PACKAGE_ROOT))
    base = resolve_base(cfg)
    try:
        return load_model_config(cfg, base), base.ref
    except UserError as exc:
        raise UserError(f"{exc}; or ship its config.json as {recipe}") from None


def capacity_plan(cfg: Config) -> dict[str, Any]:
    """The training of `cfg` on MI300X GPUs: parameters, memory per GPU, the plan, whether it fits."""
    from tasks.plumbing.device import DeviceCaps, estimate_train_bytes, plan_device

    mconf, source = base_model_config(cfg)
    facts = model_facts(cfg, mconf, BaseRef(cfg.base.name_or_path, local=False))
    t, world = cfg.train, cfg.train.num_processes
    gpus = DeviceCaps(
        backend="rocm",
        torch_version="-",
        gpu_names=(MI300X,) * world,
        gpu_memory_bytes=(MI300X_BYTES,) * world,
        bf16_native=True,
        fp16_native=True,
    )
    precision = "bf16" if t.precision == "auto" else t.precision
    shards = world if world > 1 and t.distributed == "fsdp" else 1
    sizes = {
        "total_params": facts["total_params"],
        "trainable_params": facts["lora_params"] + facts["saved_params"],
        "num_layers": facts["num_layers"],
        "hidden_size": facts["hidden_size"],
        "vocab_size": facts["vocab_size"],
        "seq_len": t.max_length,
        "micro_batch": t.per_device_train_batch_size,
        "param_bytes": 4 if precision == "fp32" else 2,
        "shards": shards,
    }
    plan = plan_device(
        gpus, precision, t.gradient_checkpointing, "sdpa", estimate_train_bytes(**sizes), "none"
    )
    estimate = estimate_train_bytes(**sizes, checkpointing=plan.gradient_checkpointing)
    fits = estimate <= MI300X_BYTES
    return {
        "gpu": f"{MI300X} ({MI300X_BYTES // 10**9} GB)",
        "config_from": source,
        "total_params": facts["total_params"],
        "trainable_params": facts["lora_params"] + facts["saved_params"],
        "processes": world,
        "distributed": t.distributed if world > 1 else None,
        "precision": plan.precision,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "memory_per_gpu_gib": round(estimate / 2**30, 1),
        "fits": fits,
        "advice": None if fits else _advice(cfg, estimate),
        "reasons": list(plan.reasons),
    }


def _advice(cfg: Config, estimate: int) -> str:
    """What to change when the estimate does not fit one GPU."""
    need = -(-estimate // MI300X_BYTES)
    return (
        f"{estimate / 10**9:.0f} GB per GPU exceeds {MI300X_BYTES // 10**9} GB: shard the base with "
        f"train.distributed: fsdp across at least {max(2, need)} GPUs (train.num_processes), or lower "
        f"train.per_device_train_batch_size ({cfg.train.per_device_train_batch_size}) / train.max_length "
        f"({cfg.train.max_length})"
    )
