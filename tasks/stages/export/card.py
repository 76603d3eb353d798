"""The model card (README.md beside the export): what the model is, its lineage, quality, limits, how to load.

Inputs a run may lack (version.json, eval/metrics.json) are stated as missing; a data remote is shown
with its credentials masked (redact_uri).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json
from tasks.core.config import Config
from tasks.core.layout import RunLayout, rule_purpose
from tasks.core.redact import redact_uri
from tasks.plumbing.cards import base_name, hub_base_id
from tasks.plumbing.general_text import RULE
from tasks.stages.export.onnx_graph import ONNX_GRAPH


def render_model_card(
    cfg: Config,
    run_dir: Path,
    summary: Mapping[str, Any],
    gate: Mapping[str, Any],
    library: str = "onnx",
) -> str:
    """The model card as Markdown, after Hugging Face YAML front matter that hubs and catalogs read.

    Args:
        cfg: the effective configuration (base, lora, train, register sections are quoted).
        run_dir: the run directory (version.json, eval/metrics.json, the adapter's config are read).
        summary: the export summary (fingerprint, opset, provider, parity, variants).
        gate: the gate decision (`read_gate`).
        library: the front matter's library_name: "onnx" (the export, what the registry serves) or
            "transformers" (merged/).
    """
    layout = RunLayout.of(run_dir)
    lines = [
        "---",
        _front_matter(cfg, layout, gate, library).rstrip("\n"),
        "---",
        "",
        f"# {cfg.register.model_name}: Q&A model (LoRA fine-tune of {base_name(cfg)}, merged)",
        "",
        *_lineage(cfg, layout, summary),
        "",
        *_parameters(cfg, layout, summary),
        "",
        *_evaluation(layout, gate),
        "",
        *_export(summary),
        "",
        *_serving(summary),
        "",
        *_USE_AND_LOADING,
    ]
    return "\n".join(lines)


def _front_matter(cfg: Config, layout: RunLayout, gate: Mapping[str, Any], library: str) -> str:
    """base_model (a hub id only), library_name, license, datasets (the DVC hash), tags, pipeline_tag and a
    model-index with the candidate's gated metrics, through huggingface_hub's own card data."""
    from huggingface_hub import EvalResult, ModelCardData

    hub_base = hub_base_id(cfg)
    version = _maybe_json(layout.version_file) or {}
    data = f"dvc:{version['dataset_hash']}" if version.get("dataset_hash") else None
    candidate = (_maybe_json(layout.eval_metrics) or {}).get("candidate") or {}
    figures = {m: candidate.get(m) for m in cfg.eval.primary_metrics}
    figures.update({r["name"]: r.get("value") for r in gate.get("rules") or () if r.get("name") == RULE})
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type="qa-lora-eval-split",
            dataset_name=f"held-out Q&A split ({data or 'unversioned'})",
            metric_type=name,
            metric_value=round(float(value), 4),
            metric_name=name.replace("_", " "),
        )
        for name, value in figures.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    card = ModelCardData(
        model_name=cfg.register.model_name,
        base_model=hub_base,
        library_name=library,
        license=cfg.export.license or _base_license(cfg) or "other",
        datasets=[data] if data else None,
        tags=["qa-lora", "lora", "question-answering", library, f"gate:{gate.get('decision', 'unknown')}"],
        pipeline_tag="text-generation",
        eval_results=results or None,
    )
    return card.to_yaml()


def _base_license(cfg: Config) -> str | None:
    """The license in a local base's own card (README.md front matter), if it has one."""
    readme = Path(cfg.resolve(cfg.base.name_or_path)) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.license
    except (OSError, ValueError):
        return None


def _lineage(cfg: Config, layout: RunLayout, summary: Mapping[str, Any]) -> list[str]:
    revision = f" (revision `{cfg.base.revision}`)" if cfg.base.revision else ""
    lines = ["## Lineage", f"- Base model: `{base_name(cfg)}`{revision}"]
    version = _maybe_json(layout.version_file)
    if version and version.get("dataset_hash"):
        remote = f", remote `{redact_uri(str(version['remote']))}`" if version.get("remote") else ""
        lines.append(f"- Data version (DVC): `{version['dataset_hash']}`{remote}")
    else:
        lines.append(
            f"- Data version (DVC): not available ({layout.version_file.name} missing or without dataset_hash)"
        )
    return [
        *lines,
        f"- Params hash: `{cfg.params_hash()}` (effective config of this run: params.effective.yaml)",
        f"- Export fingerprint: `{summary.get('fingerprint', '?')}`",
    ]


def _parameters(cfg: Config, layout: RunLayout, summary: Mapping[str, Any]) -> list[str]:
    # The adapter's own config is what was trained; params.yaml only says what was asked for.
    adapter = _maybe_json(layout.adapter_dir / "adapter_config.json") or {}
    targets = adapter.get("target_modules")
    lora = {
        "r": adapter.get("r", cfg.lora.r),
        "alpha": adapter.get("lora_alpha", cfg.lora.alpha),
        "dropout": adapter.get("lora_dropout", cfg.lora.dropout),
        "targets": sorted(targets) if isinstance(targets, list) else list(cfg.lora.target_modules),
        "saved": adapter.get("modules_to_save") if adapter else list(cfg.lora.modules_to_save),
    }
    saved = f"; trained in full: {', '.join(sorted(lora['saved']))}" if lora["saved"] else ""
    train = cfg.train
    return [
        "## Parameters (highlights)",
        f"- LoRA ({'adapter_config.json' if adapter else 'params'}): r={lora['r']}, alpha={lora['alpha']}, "
        f"dropout={lora['dropout']}, target modules {', '.join(lora['targets'])}{saved}",
        f"- Training: epochs={train.num_train_epochs}, max_steps={train.max_steps}, lr={train.learning_rate}, "
        f"schedule={train.lr_scheduler_type}, batch={train.per_device_train_batch_size}x{train.gradient_accumulation_steps}, "
        f"max_length={train.max_length}, seed={train.seed}",
        *_chat(summary.get("chat") or {}),
    ]


def _chat(chat: Mapping[str, Any]) -> list[str]:
    """The chat format the model was trained in (the base's template or a built-in one) and its fingerprint."""
    if not chat:
        return ["- Chat format: not recorded"]
    example = json.dumps(chat.get("example", ""), ensure_ascii=False)
    return [
        f"- Chat format: the {chat.get('template')} chat template (fingerprint `{chat.get('fingerprint')}`), "
        f"end of turn `{chat.get('end_of_turn')}`; one exchange renders as {example}",
    ]


def _evaluation(layout: RunLayout, gate: Mapping[str, Any]) -> list[str]:
    lines = ["## Evaluation"]
    metrics = _maybe_json(layout.eval_metrics)
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _flatten_numbers(metrics)]
    else:
        lines.append(f"- Metrics: not available ({layout.eval_metrics.relative_to(layout.root)} missing)")
    decision = gate.get("decision") or ("pass" if gate.get("passed") else "fail")
    lines += ["", f"- Regression gate: **{decision}** (primary metric {gate.get('primary_metric', '?')})"]
    lines += [f"  - {r}" for r in gate.get("reasons") or []]
    lines += ["", "What each gate rule protects:"]
    seen: set[str] = set()
    for rule in gate.get("rules") or []:
        name = str(rule.get("name", "")).split(":", 1)[0].split("[", 1)[0]
        if name not in seen and rule_purpose(name):
            seen.add(name)
            lines.append(f"- `{name}` ({'passed' if rule.get('passed') else 'failed'}): {rule_purpose(name)}")
    return lines


def _export(summary: Mapping[str, Any]) -> list[str]:
    parity = summary.get("parity", {})
    onnx_p, merge_p = parity.get("onnx", {}), parity.get("merge", {})
    provider = summary.get("provider") or {}
    lines = [
        "## Export",
        f"- Merged: fp32 safetensors in `merged/` (adapter merged with PEFT `merge_and_unload`); merge parity "
        f"max |logit diff| {merge_p.get('max_abs_diff', float('nan')):.3g}, greedy identical: {merge_p.get('tokens_identical')}",
        f"- ONNX: `onnx/{ONNX_GRAPH}`, opset {summary.get('opset')}, one decoder graph with KV cache (past/present), "
        "dynamic batch and sequence; layout in `onnx/onnx_layout.json`",
        f"- Parity PyTorch vs ONNX Runtime ({onnx_p.get('provider', '?')}, {parity.get('prompts', '?')} eval prompts, "
        f"{parity.get('new_tokens', '?')} new tokens): max |logit diff| {onnx_p.get('max_abs_diff', float('nan')):.3g} "
        f"(atol {onnx_p.get('atol')}), greedy identical: {onnx_p.get('tokens_identical')}",
    ]
    if provider.get("cpu_fallback"):
        lines.append(
            f"- **CPU fallback** (export.allow_cpu_fallback): {provider['cpu_fallback']}; parity was checked "
            "on the CPU provider, not on the GPU one"
        )
    for name, v in (summary.get("variants") or {}).items():
        lines.append(
            f"- Variant {name}: `{v['path']}`, top-1 agreement with fp32 {v['top1_agreement']:.4f} (min {v['min_top1']})"
        )
    return lines


_SERVING_ROWS = (
    ("tokens/s, batch 1", "tokens_per_s_b1", "{:.0f}"),
    ("tokens/s, batch 8", "tokens_per_s_b8", "{:.0f}"),
    ("latency p50 per request (ms)", "latency_p50_ms", "{:.0f}"),
    ("latency p95 per request (ms)", "latency_p95_ms", "{:.0f}"),
    ("export on disk (MiB)", "size_bytes", "{:.1f}"),
    ("peak RSS, load + answer (MiB)", "peak_rss_bytes", "{:.0f}"),
)


def _serving(summary: Mapping[str, Any]) -> list[str]:
    """Serving cost as measured at export: candidate beside the champion, and the serving rules."""
    serving = summary.get("serving")
    if not serving:
        return ["## Serving cost", "- Not measured (an export written before the serving measurement)."]
    cand, champ = serving["candidate"], serving.get("champion")
    head = "| | this model |" + (f" champion v{champ['version']} |" if champ else "")
    lines = [
        "## Serving cost",
        f"Measured at export with ONNX Runtime ({cand.get('provider', '?')}) in a fresh process per "
        f"measurement: {serving['questions']} eval questions, up to {serving['max_new_tokens']} new tokens, "
        f"best of {serving['repeats']} turns"
        + (", taking turns with the champion on the same machine." if champ else "; no champion yet."),
        "",
        head,
        "|---|---|" + ("---|" if champ else ""),
    ]
    for label, key, fmt in _SERVING_ROWS:
        scale = 2**20 if key.endswith("_bytes") else 1
        cells = [fmt.format(side[key] / scale) for side in (cand, champ) if side]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {'PASS' if r['passed'] else 'FAIL'} `{r['name']}`: {r['detail']}" for r in serving["rules"]]
    return lines


_USE_AND_LOADING = [
    "## Intended use and limits",
    "- Intended use: short factual answers to questions in the domain of the fine-tuning data, prompted with the "
    "template above; greedy decoding.",
    "- Not for: open-ended advice, safety-critical decisions, or questions outside the training data's domain; "
    "the model can state wrong answers fluently. Check the evaluation section and the gate before relying on it.",
    "- The model was not tuned for refusal, safety or multi-turn chat.",
    "",
    "## How to load",
    "With transformers (PyTorch):",
    "```python",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    'tok = AutoTokenizer.from_pretrained("merged")',
    'model = AutoModelForCausalLM.from_pretrained("merged")',
    'messages = [{"role": "user", "content": "What does zip() return?"}]',
    'enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
    "out = model.generate(**enc, max_new_tokens=64, do_sample=False)",
    'print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))',
    "```",
    "With ONNX Runtime (no torch needed; one runtime extra installed: cpu, rocm, migraphx or cuda; provider "
    "auto: MIGraphX, ROCm, CUDA, CPU):",
    "```python",
    "from tasks.plumbing.onnx_generate import load_onnx_generator",
    'gen = load_onnx_generator("onnx")',
    'print(gen.generate([gen.chat.prompt("What does zip() return?")], max_new_tokens=64).texts[0])',
    "```",
    "",
]


def _maybe_json(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _flatten_numbers(data: Mapping[str, Any], prefix: str = "", limit: int = 40) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _flatten_numbers(value, f"{name}.", limit)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, f"{value:.4g}" if isinstance(value, float) else str(value)))
    return out[:limit]
