"""`train.precision: auto` and `train.kernels: auto` by measurement: a few forward+backward steps of the
actual model with each option the device offers (tasks.plumbing.verdicts decides and caches the verdict).

Precision:

* Explicit `fp32`/`bf16`/`fp16`: obeyed, nothing measured.
* No native bf16: fp32 (the device plan's rule), nothing measured.
* A CPU whose bf16 capability is forced (QA_LORA_CPU_BF16=0|1): the device plan's rule for the forced
  kind (bf16 | fp32), not measured, so the variable still runs either precision path on any machine.
* A model too big to probe on one device (FSDP, or fp32 weights over half the smallest GPU): the
  device plan's rule (native bf16), not measured.
* Otherwise (native bf16, auto): the probe trains `PROBE_STEPS` steps (after one warm-up step) on a
  batch of the real micro batch size and the train split's median templated length, in fp32 and in
  bf16, and the faster wins (ties to fp32). The verdict is cached per (machine, model shape, batch shape) in
  `$QA_LORA_CACHE_DIR/precision.json` (default ~/.cache/qa-lora): torchrun workers and later runs on
  the same machine reuse it, so every rank trains in the same precision.

Kernels (after the precision is known; they are measured in it):
* Explicit `none`/`liger`/`compile`: obeyed (the device plan refuses liger without a GPU and the package).
* CPU: none (the device plan's rule), nothing measured.
* A model too big to probe on one device: none, not measured.
* Otherwise (a GPU, auto): the same probe with the model as is, patched by Liger (where liger-kernel is
  installed) and under torch.compile; the fastest wins, ties to none. Cached in `kernels.json` beside the
  precision verdicts. The rate is the steady state on one shape (the warm-up step pays the compile); the
  Trainer pads to coarse lengths on GPUs (trainer.py), so a run meets few new shapes.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.core.layout import RunLayout
from tasks.plumbing.chat import chat_format
from tasks.plumbing.loading import BaseRef, load_tokenizer
from tasks.plumbing.splits import read_split_rows
from tasks.plumbing.verdicts import Verdict, cache_key, choose, kernel_candidates, precision_candidates
from tasks.stages.train.model import load_model, lora_config

log = logging.getLogger("qa_lora.train")

PROBE_STEPS = 3  # timed steps per precision, after one warm-up step (first-shape costs)
SAMPLE_ROWS = 512  # rows whose templated length gives the probe's sequence length


def cache_file(setting: str = "precision") -> Path:
    """Where verdicts are cached: $QA_LORA_CACHE_DIR/<setting>.json (default ~/.cache/qa-lora)."""
    root = os.environ.get("QA_LORA_CACHE_DIR") or str(Path.home() / ".cache" / "qa-lora")
    return Path(root) / f"{setting}.json"


def precision_verdict(
    cfg: Config, layout: RunLayout, base: BaseRef, info: dict[str, Any], caps: Any
) -> Verdict | None:
    """The measured precision for `train.precision: auto` on a device with a choice, else None
    (explicit precision, no native bf16, or a forced capability: the device plan's rule decides)."""
    if cfg.train.precision != "auto" or not caps.bf16_native or caps.bf16_forced is not None:
        return None
    return _measured_verdict(
        "precision",
        precision_candidates(caps.bf16_native),
        lambda precision, shape: measure_rate(cfg, base, caps, precision, shape),
        cfg,
        layout,
        info,
        caps,
    )


def kernels_verdict(
    cfg: Config, layout: RunLayout, base: BaseRef, info: dict[str, Any], caps: Any, precision: str
) -> Verdict | None:
    """The measured kernels for `train.kernels: auto` on a GPU, in the chosen `precision`, else None
    (explicit kernels, a CPU, or a model too big to probe: the device plan's rule decides)."""
    if cfg.train.kernels != "auto" or caps.backend == "cpu":
        return None
    return _measured_verdict(
        "kernels",
        kernel_candidates(caps.liger_installed),
        lambda kernels, shape: measure_rate(cfg, base, caps, precision, shape, kernels),
        cfg,
        layout,
        info,
        caps,
        extra={"precision": precision},  # kernels are measured, and cached, per precision
    )


def _measured_verdict(
    setting: str,
    options: tuple[str, ...],
    measure: Callable[[str, tuple[int, int]], float],
    cfg: Config,
    layout: RunLayout,
    info: dict[str, Any],
    caps: Any,
    extra: dict[str, Any] | None = None,
) -> Verdict | None:
    """One setting's verdict from the cache or the probe (None when the model is too big to probe)."""
    if not _probe_fits(cfg, info, caps):
        log.info("%s: auto not measured (the model is too big to probe on one device)", setting)
        return None
    batch_shape, machine, model_shape, about = _probe_facts(cfg, layout, info, caps)
    extra = extra or {}
    verdict = choose(
        setting,
        options,
        lambda option: measure(option, batch_shape),
        key=cache_key(machine, {**model_shape, **extra}, batch_shape),
        cache_file=cache_file(setting),
        about={**about, **extra},
    )
    log.info("%s verdict%s: %s", setting, " (cached)" if verdict.cached else "", verdict.reason)
    return verdict


def apply_verdict(plan: Any, verdict: Verdict | None) -> Any:
    """The plan with the verdict's choice and its reason in place of the rule's (precision or kernels)."""
    if verdict is None:
        return plan
    prefix = f"{verdict.setting}="
    reasons = tuple(verdict.reason if r.startswith(prefix) else r for r in plan.reasons)
    return dataclasses.replace(plan, **{verdict.setting: verdict.choice}, reasons=reasons)


def _probe_facts(
    cfg: Config, layout: RunLayout, info: dict[str, Any], caps: Any
) -> tuple[tuple[int, int], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The batch shape to probe, and the machine and model facts a verdict is cached by, and its words."""
    batch_shape = (cfg.train.per_device_train_batch_size, _probe_length(cfg, layout))
    machine = {
        "backend": caps.backend,
        "gpus": list(caps.gpu_names),
        "cpu_flags": list(caps.cpu_flags),
        "cpu_count": caps.cpu_count,
        "threads": cfg.runtime.num_threads,
        "torch": caps.torch_version,
    }
    model_shape = {
        **{k: info.get(k) for k in ("model_type", "total_params", "num_layers", "hidden_size", "vocab_size")},
        "lora": cfg.lora.model_dump(mode="json"),
        "attn": cfg.train.attn_implementation,
    }
    about = {
        "model": f"{info.get('model_type')} {info.get('total_params')} params, LoRA r={cfg.lora.r}",
        "batch": f"{batch_shape[0]} x {batch_shape[1]} tokens",
        "device": caps.gpu_names[0]
        if caps.gpu_names
        else f"cpu ({', '.join(caps.cpu_flags) or 'no bf16/amx flags'})",
    }
    return batch_shape, machine, model_shape, about


def measure_rate(
    cfg: Config, base: BaseRef, caps: Any, precision: str, batch_shape: tuple[int, int], kernels: str = "none"
) -> float:
    """Tokens/s of LoRA training steps (forward, backward, AdamW) of the base in `precision`, with the
    model patched by Liger's kernels (`kernels="liger"`) or run under torch.compile (`"compile"`)."""
    import torch
    from peft import get_peft_model

    from tasks.plumbing.device import plan_device

    plan = plan_device(caps, precision, False, cfg.train.attn_implementation)
    model = load_model(cfg, base, plan)
    model.config.use_cache = False
    torch.manual_seed(cfg.train.seed)
    model = get_peft_model(model, lora_config(cfg.lora))
    if kernels == "liger":
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, {})  # what the Trainer does with use_liger_kernel=True
    forward = torch.compile(model) if kernels == "compile" else model
    try:
        return _steps_per_second(model, forward, precision, batch_shape) * batch_shape[0] * batch_shape[1]
    finally:
        device = next(model.parameters()).device
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _steps_per_second(model: Any, forward: Any, precision: str, batch_shape: tuple[int, int]) -> float:
    """Optimizer steps per second on one random batch, after one warm-up step (first-shape costs and
    the compile); `forward` is the model or its compiled wrapper."""
    import torch

    model.train()
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    ids = torch.randint(3, max(4, model.config.vocab_size), batch_shape, device=device)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(PROBE_STEPS):
        step()
    _sync(device)
    return PROBE_STEPS / max(time.perf_counter() - started, 1e-9)


def _probe_fits(cfg: Config, info: dict[str, Any], caps: Any) -> bool:
    """Whether the probe can train the model alone on one device in fp32 (FSDP-sized models cannot)."""
    if cfg.train.num_processes > 1 and cfg.train.distributed == "fsdp":
        return False
    fp32_weights = 4 * int(info.get("total_params") or 0)
    return not caps.gpu_memory_bytes or fp32_weights <= 0.5 * min(caps.gpu_memory_bytes)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _probe_length(cfg: Config, layout: RunLayout) -> int:
    """The train split's median rendered length (first SAMPLE_ROWS rows), rounded up to 8, capped."""
    rows = list(itertools.islice(read_split_rows(layout.train_split, "train split"), SAMPLE_ROWS))
    chat = chat_format(cfg, load_tokenizer(cfg, padding_side="right"))
    lengths = [len(ids) for ids, _ in chat.encode(rows)]
    median = int(statistics.median(lengths)) if lengths else cfg.train.max_length
    return min(cfg.train.max_length, -(-median // 8) * 8)
