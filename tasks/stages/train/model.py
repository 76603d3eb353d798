"""The base model for training: checks against the params before any step, loading, the LoRA config.

:func:`inspect_base` reads only the model's config and builds it on the meta device (no weights), so a
bad `lora.target_modules` or a `train.max_length` above the model's limit fails in seconds with one
line, before any checkpoint directory or MLflow run exists. :func:`lora_config` is the one translation
of the `lora:` params to PEFT (the benchmarks and the reference-preset test use it too).
"""

from __future__ import annotations

import os
from typing import Any

from tasks.core.config import Config, LoraSection
from tasks.core.errors import UserError
from tasks.plumbing.loading import BaseRef, hub_kwargs


def load_model_config(cfg: Config, base: BaseRef) -> Any:
    """The base model's transformers config.

    Raises:
        UserError: it cannot be loaded, or it needs remote code while `base.trust_remote_code` is off.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base.ref, **hub_kwargs(cfg))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in str(exc) and not cfg.base.trust_remote_code:
            raise UserError(
                f"base.name_or_path: {base.ref!r} needs its own model code to load; it is not run unless "
                "you set base.trust_remote_code: true (review that code first)"
            ) from None
        raise UserError(f"base.name_or_path: cannot load the config of {base.ref!r}: {first}") from None


def inspect_base(cfg: Config, base: BaseRef) -> dict[str, Any]:
    """Check the params against the model (on the meta device: no weights read) before any step.

    Returns:
        The model facts the device plan needs (see :func:`model_facts`).

    Raises:
        UserError: a non-positive learning rate or rank, max_length above the model's limit, or a
            LoRA target that names no adaptable module.
    """
    t = cfg.train
    if t.learning_rate <= 0:  # the config refuses it too; this stage must not depend on that
        raise UserError(f"train.learning_rate: must be > 0 (got {t.learning_rate})")
    if cfg.lora.r <= 0:
        raise UserError(f"lora.r: must be > 0 (got {cfg.lora.r})")
    return model_facts(cfg, load_model_config(cfg, base), base)


def model_facts(cfg: Config, mconf: Any, base: BaseRef) -> dict[str, Any]:
    """The model of config `mconf` built on the meta device, checked against `lora` and `train.max_length`.

    Returns:
        model_type, total_params, lora_params, saved_params (lora.modules_to_save, trained in full),
        num_layers, hidden_size, vocab_size, max_position_embeddings.
    """
    import torch
    from transformers import AutoModelForCausalLM

    text = mconf.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    if limit is not None and cfg.train.max_length > limit:
        raise UserError(
            f"train.max_length: {cfg.train.max_length} exceeds the base model's max_position_embeddings "
            f"{limit} ({base.ref}); use a value <= {limit}"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mconf, trust_remote_code=cfg.base.trust_remote_code)
    return {
        "model_type": getattr(mconf, "model_type", None),
        "total_params": sum(p.numel() for p in model.parameters()),
        "lora_params": _check_target_modules(cfg, model, base),
        "saved_params": _check_modules_to_save(cfg, model, base),
        "num_layers": getattr(text, "num_hidden_layers", 1),
        "hidden_size": getattr(text, "hidden_size", 0),
        "vocab_size": getattr(text, "vocab_size", 0),
        "max_position_embeddings": limit,
    }


def _lora_size(module: Any, r: int) -> int:
    """LoRA parameters that rank `r` adds to `module` (0 for modules LoRA cannot adapt here)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return r * (module.in_features + module.out_features)
    if isinstance(module, torch.nn.Embedding):
        return r * (module.num_embeddings + module.embedding_dim)
    return 0


def _named_like(named: dict[str, Any], target: str) -> list[Any]:
    """The modules PEFT's suffix match selects for `target` (the name itself or a dotted suffix)."""
    return [m for name, m in named.items() if name == target or name.endswith("." + target)]


def _check_target_modules(cfg: Config, model: Any, base: BaseRef) -> int:
    """Every lora.target_modules entry must name a Linear/Embedding of the model (PEFT suffix match).

    Returns the LoRA parameter count these targets give at rank lora.r.
    """
    import torch

    r, targets = cfg.lora.r, cfg.lora.target_modules
    named = dict(model.named_modules())
    if targets == ("all-linear",):  # PEFT's shorthand: every Linear except the output head
        out_head = model.get_output_embeddings()
        return sum(
            _lora_size(m, r) for m in named.values() if isinstance(m, torch.nn.Linear) and m is not out_head
        )
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name, m in named.items() if _lora_size(m, r)})
    total = 0
    for target in targets:
        matches = _named_like(named, target)
        if not matches:
            raise UserError(
                f"lora.target_modules: {target!r} matches no module of {base.ref}; "
                f"adaptable modules here: {', '.join(leaf_names)} (or all-linear)"
            )
        sizes = [_lora_size(m, r) for m in matches]
        if not any(sizes):
            kinds = sorted({type(m).__name__ for m in matches})
            raise UserError(
                f"lora.target_modules: {target!r} names {', '.join(kinds)} modules, which LoRA cannot "
                f"adapt here; use Linear or Embedding modules such as {', '.join(leaf_names[:6])}"
            )
        total += sum(sizes)
    return total


def _check_modules_to_save(cfg: Config, model: Any, base: BaseRef) -> int:
    """Every lora.modules_to_save entry must name a module with parameters (PEFT suffix match).

    Returns the parameters they train in full (tied weights counted once: PEFT keeps them tied).
    """
    named = dict(model.named_modules())
    params: dict[int, int] = {}
    for target in cfg.lora.modules_to_save:
        matches = _named_like(named, target)
        if not any(True for m in matches for _ in m.parameters()):
            raise UserError(
                f"lora.modules_to_save: {target!r} matches no module with weights of {base.ref}; "
                "name one such as embed_tokens, lm_head or norm"
            )
        params.update((id(p), p.numel()) for m in matches for p in m.parameters())
    return sum(params.values())


def load_model(cfg: Config, base: BaseRef, plan: Any) -> Any:
    """The base model's weights in the plan's precision and attention, on this process's device.

    Raises:
        UserError: the weights cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[plan.precision]
    kwargs: dict[str, Any] = {
        **hub_kwargs(cfg),
        "dtype": dtype,
        "attn_implementation": plan.attn_implementation,
        # safetensors only, unless the user accepted pickles (they can execute code when loaded)
        "use_safetensors": None if cfg.base.allow_pickle_weights else True,
    }
    if plan.device == "cuda" and not (cfg.train.num_processes > 1 and cfg.train.distributed == "fsdp"):
        # Straight onto this process's GPU: N processes would otherwise each stage a full copy in host RAM.
        # (FSDP: each process loads into host memory and fully_shard moves its shard to its GPU.)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        return AutoModelForCausalLM.from_pretrained(base.ref, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"base.name_or_path: cannot load {base.ref!r}: {first}") from None


def lora_config(lora: LoraSection) -> Any:
    """The `lora:` params as a PEFT LoraConfig for a causal LM (the one translation).

    Args:
        lora: the `lora` config section.

    Returns:
        A `peft.LoraConfig`; `target_modules: [all-linear]` becomes PEFT's "all-linear" shorthand.
        `modules_to_save` keeps a tied input/output embedding tied (`ensure_weight_tying`): trained
        apart, the merged model saved with `tie_word_embeddings` would reload with the wrong head.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if lora.target_modules == ("all-linear",) else list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save) or None,
        ensure_weight_tying=bool(lora.modules_to_save),
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
