"""`qa-lora export`: merge the LoRA adapter into the base, export ONNX with a KV cache, check parity.

Readable top to bottom (each step is a function of a module beside this one):

1. Inputs: run_dir/train/adapter, run_dir/data/eval.jsonl (parity prompts), the base model, and a
   passing gate (eval/gate.json; missing or failed: refused). A re-run whose inputs and export params
   are unchanged returns the existing export (idempotent; inputs.py).
2. Runtime: exactly one ONNX Runtime distribution, the provider (`export.provider`, auto: MIGraphX, ROCm,
   CUDA, CPU) loaded for real before any expensive work; a GPU provider that does not load fails the
   stage unless `export.allow_cpu_fallback` (then the fallback is recorded; tasks.plumbing.ort_runtime).
3. Memory: parameter count x copies needed, against free RAM and GPU memory (memory.py).
4. Merge: the base in fp32, `merge_and_unload()`, adapter-on-base vs merged parity (merge.py); saved as
   safetensors + tokenizer + generation_config in export/merged/.
5. ONNX: one decoder graph with past/present KV cache in export/onnx/ with the tokenizer and
   `onnx_layout.json`; parity PyTorch vs ONNX Runtime on a left-padded batch (onnx_graph.py).
6. Optional fp16 / int8 variants, each checked (variants.py).
7. Serving cost: the ONNX model as served (tokens/s at batch 1 and 8, p50/p95 latency, size, peak RSS
   of a fresh process), beside the registry's champion measured the same way in turns; slower or
   larger than `gate.max_latency_regression` / `gate.max_size_regression` allow: refused (serving_gate.py).
8. Model card (README.md, also copied into merged/ and onnx/; card.py) and export_summary.json.

Everything is written into a temporary sibling of run_dir/export and renamed into place at the end,
so a failure (parity included) leaves no new export behind.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir, disk_space
from tasks.core.config import Config
from tasks.core.layout import RunLayout, read_gate
from tasks.plumbing.chat import ChatFormat, chat_format, check_same_format
from tasks.plumbing.loading import load_tokenizer, resolve_base
from tasks.plumbing.ort_runtime import (
    ProviderChoice,
    choose_provider,
    cpu_choice,
    import_onnxruntime,
    probe_provider,
)
from tasks.plumbing.registry import fetched_champion
from tasks.stages.export.card import render_model_card
from tasks.stages.export.inputs import (
    CODE_VERSION,
    check_inputs,
    dir_size,
    export_fingerprint,
    export_result,
    parity_questions,
    reusable_summary,
    versions,
)
from tasks.stages.export.memory import export_disk_need, plan_export_memory
from tasks.stages.export.merge import generation_config, merge_adapter, raise_if_failed, torch_greedy
from tasks.stages.export.onnx_graph import ONNX_GRAPH, check_onnx_parity, export_onnx, graph_size
from tasks.stages.export.serving_gate import measure_serving, raise_if_refused
from tasks.stages.export.variants import export_variants

log = logging.getLogger("qa_lora.export")


@dataclass(frozen=True)
class _Job:
    """What one export works from, decided before anything heavy loads."""

    cfg: Config
    layout: RunLayout
    base_src: str
    questions: list[str]
    fingerprint: str
    gate: dict[str, Any]
    choice: ProviderChoice
    cpu_fallback: str | None


def export_model(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Merge the adapter into the base, export ONNX with a KV cache and check parity.

    Args:
        cfg: the effective configuration (`base`, `export`, `runtime` sections are used).
        run_dir: the run directory; reads train/adapter, data/eval.jsonl and eval/gate.json, writes export/.

    Returns:
        Paths of the export (merged/, onnx/, model card, summary), the provider (and any CPU fallback),
        parity numbers and the input fingerprint; `reused` tells whether an identical export was kept.

    Raises:
        UserError: missing inputs, a missing or failed gate, a quantized base, too little memory, no (or
            several) ONNX Runtime installed, an unavailable provider.
        OutOfSpace: the run directory's filesystem lacks the export's size (before or while writing).
        ProviderUnavailable: the chosen GPU provider did not load and `export.allow_cpu_fallback` is off.
        ExportParityError: merge or ONNX parity outside tolerance (the stage fails, nothing is written).
    """
    t_start = time.perf_counter()
    layout = RunLayout.of(run_dir)
    check_inputs(layout)
    # `dvc repro` and `qa-lora export` reach here without the DAG's gate task: refuse the same way.
    gate = read_gate(layout.root, require_pass=True)
    questions = parity_questions(layout.eval_split, cfg.export.parity_prompts)
    base_src = resolve_base(cfg).ref
    fingerprint = export_fingerprint(cfg, layout, base_src, questions)
    reused = reusable_summary(layout, fingerprint)
    if reused is not None:
        log.info("export: inputs unchanged (fingerprint %s); keeping %s", fingerprint, layout.export_dir)
        return export_result(layout, reused, reused=True)

    choice, fallback = _choose_provider(cfg)
    job = _Job(cfg, layout, base_src, questions, fingerprint, gate, choice, fallback)
    needed = export_disk_need(cfg, base_src)
    # A full disk, found before or while writing, is one line; the temporary goes, and with it the space.
    with (
        disk_space(layout.export_dir, needed, "the export (merged, ONNX)"),
        atomic_dir(layout.export_dir) as tmp,
    ):
        summary = _build(job, tmp, t_start)
    log.info("export: done in %.1fs -> %s", time.perf_counter() - t_start, layout.export_dir)
    return export_result(layout, summary, reused=False)


def _choose_provider(cfg: Config) -> tuple[ProviderChoice, str | None]:
    """The provider to run on, proven to load; after an allowed fallback, the CPU (recorded)."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    choice = choose_provider(available, cfg.export.provider)
    log.info("export: ONNX Runtime provider %s (%s)", choice.name, choice.reason)
    fallback = None
    if choice.name != "CPUExecutionProvider":
        fallback = probe_provider(choice, allow_cpu_fallback=cfg.export.allow_cpu_fallback)
    if fallback is not None:
        # Later sessions go straight to the CPU instead of failing to load the GPU provider again.
        choice = cpu_choice(available, f"CPU fallback from {choice.name} (export.allow_cpu_fallback)")
    return choice, fallback


@dataclass(frozen=True)
class _Batch:
    """The parity prompts, encoded once (left-padded) with the tokenizer the export ships."""

    prompts: list[str]
    ids: Any
    mask: Any
    chat: ChatFormat  # of the adapter's tokenizer, which the export ships
    gen_config: Any


def _build(job: _Job, tmp: Path, t_start: float) -> dict[str, Any]:
    """Steps 3-7 into the temporary export directory `tmp`; returns the summary written there."""
    import torch

    cfg = job.cfg
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    memory = plan_export_memory(cfg, job.base_src)
    log.info("export: %s", memory["reason"])
    batch = _encode(cfg, job)
    merged, merge_parity = _merge_and_save(job, batch, memory["merge_device"], tmp)
    timings["merge_s"] = time.perf_counter() - t
    # Reference for ONNX parity: the merged fp32 model on CPU (where the ONNX graph is traced).
    reference = torch_greedy(merged, batch.ids, batch.mask, batch.gen_config, cfg.export.parity_new_tokens)

    t = time.perf_counter()
    onnx_dir = tmp / job.layout.onnx_dir.name
    graph = export_onnx(merged, batch.chat, batch.gen_config, onnx_dir, cfg.export.opset)
    timings["export_onnx_s"] = time.perf_counter() - t
    log.info("export: ONNX graph written in %.1fs", timings["export_onnx_s"])
    del merged
    gc.collect()

    t = time.perf_counter()
    ids, mask = batch.ids.numpy(), batch.mask.numpy()
    new_tokens = cfg.export.parity_new_tokens
    onnx_parity = check_onnx_parity(onnx_dir, job.choice, batch.prompts, ids, mask, reference, new_tokens)
    timings["onnx_parity_s"] = time.perf_counter() - t
    _log_onnx_parity(onnx_parity)
    raise_if_failed("ONNX (PyTorch vs ONNX Runtime, fp32)", onnx_parity, cfg.export.logits_atol)
    variants = export_variants(cfg, onnx_dir, job.choice, ids, mask, reference)

    t = time.perf_counter()
    serving = _serving_cost(job, onnx_dir)
    timings["serving_cost_s"] = time.perf_counter() - t

    timings["total_s"] = time.perf_counter() - t_start
    parity = {"merge": merge_parity, "onnx": onnx_parity}
    summary = _summary(job, memory, parity, batch, variants, graph, timings, tmp)
    summary["serving"] = serving
    _write_outputs(job, tmp, summary)
    return summary


def _serving_cost(job: _Job, onnx_dir: Path) -> dict[str, Any]:
    """The ONNX model as served, beside the registry's champion (serving_gate.py); a candidate that
    serves slower or larger than the margins allow is refused here (GateFailed), before anything lands."""
    cfg = job.cfg
    questions = parity_questions(job.layout.eval_split, cfg.export.serving_prompts)
    with fetched_champion(cfg) as champion:
        serving = measure_serving(cfg, onnx_dir, champion, questions, job.choice.name)
    raise_if_refused(serving)
    return serving


def _encode(cfg: Config, job: _Job) -> _Batch:
    """The parity prompts rendered by the chat format, after checking the adapter was trained in it."""
    check_same_format(job.layout.adapter_dir, chat_format(cfg, load_tokenizer(cfg)))
    tokenizer = load_tokenizer(cfg, job.layout.adapter_dir, padding_side="left")
    chat = chat_format(cfg, tokenizer)
    prompts = [chat.prompt(q) for q in job.questions]
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    gen_config = generation_config(cfg, tokenizer, chat.stop_token_ids)
    return _Batch(prompts, enc["input_ids"], enc["attention_mask"], chat, gen_config)


def _merge_and_save(job: _Job, batch: _Batch, device: str, tmp: Path) -> tuple[Any, dict[str, Any]]:
    """Merge (parity checked), then save merged/ with its tokenizer and generation config."""
    cfg = job.cfg
    merged, parity = merge_adapter(
        cfg, job.base_src, job.layout.adapter_dir, device, batch.ids, batch.mask, batch.gen_config
    )
    log.info(
        "export: merged on %s; merge parity max|dlogit|=%.3g, greedy identical=%s",
        device,
        parity["max_abs_diff"],
        parity["tokens_identical"],
    )
    raise_if_failed("merge (adapter-on-base vs merged)", parity, cfg.export.merge_atol)
    merged_dir = tmp / job.layout.merged_dir.name
    merged.generation_config = batch.gen_config
    merged.save_pretrained(str(merged_dir))
    batch.chat.tokenizer.save_pretrained(str(merged_dir))
    batch.chat.frame().save(merged_dir)
    return merged, parity


def _log_onnx_parity(parity: Mapping[str, Any]) -> None:
    log.info(
        "export: ONNX parity on %s: prompt max|dlogit|=%.3g, step max|dlogit|=%.3g, greedy identical=%s",
        parity["provider"],
        parity["prefill_max_abs_diff"],
        parity["step_max_abs_diff"],
        parity["tokens_identical"],
    )


def _summary(
    job: _Job,
    memory: dict[str, Any],
    parity: Mapping[str, dict[str, Any]],
    batch: _Batch,
    variants: dict[str, Any],
    graph: Mapping[str, Any],
    timings: Mapping[str, float],
    tmp: Path,
) -> dict[str, Any]:
    """export_summary.json: lineage, provider (and any CPU fallback), memory, parity, sizes, versions."""
    cfg = job.cfg
    return {
        "fingerprint": job.fingerprint,
        "code_version": CODE_VERSION,
        "base": {
            "name_or_path": cfg.base.name_or_path,
            "source": job.base_src,
            "revision": cfg.base.revision,
        },
        "adapter": str(job.layout.adapter_dir),
        "chat": batch.chat.describe(),
        "params_hash": cfg.params_hash(),
        "opset": cfg.export.opset,
        "dtype": "float32",
        "provider": {**job.choice.to_dict(), "cpu_fallback": job.cpu_fallback},
        "memory": memory,
        "parity": {
            "prompts": len(job.questions),
            "new_tokens": cfg.export.parity_new_tokens,
            "prompt_lengths": [int(n) for n in batch.mask.sum(dim=1).tolist()],
            "merge": {**parity["merge"], "atol": cfg.export.merge_atol},
            "onnx": {**parity["onnx"], "atol": cfg.export.logits_atol},
        },
        "variants": variants,
        "layout": {k: graph[k] for k in ("graph", "num_layers", "num_key_value_heads", "head_dim")},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "sizes_bytes": {
            "merged": dir_size(tmp / job.layout.merged_dir.name),
            "onnx_fp32": graph_size(tmp / job.layout.onnx_dir.name / ONNX_GRAPH),
        },
        "versions": versions(),
    }


def _write_outputs(job: _Job, tmp: Path, summary: Mapping[str, Any]) -> None:
    """The model card at the export's top and in merged/ and onnx/, and export_summary.json."""
    card_name = job.layout.model_card.name
    for where, library in (
        (tmp, "onnx"),
        (tmp / job.layout.merged_dir.name, "transformers"),
        (tmp / job.layout.onnx_dir.name, "onnx"),
    ):
        card = render_model_card(job.cfg, job.layout.root, summary, job.gate, library)
        (where / card_name).write_text(card, encoding="utf-8")
    text = json.dumps(summary, indent=2) + "\n"
    (tmp / job.layout.export_summary.name).write_text(text, encoding="utf-8")
