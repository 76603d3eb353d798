"""`qa-lora export`: merge the LoRA adapter into the base, export ONNX with a KV cache, check parity.

Readable top to bottom:

1. Inputs: run_dir/train/adapter, run_dir/data/eval.jsonl (parity prompts), the base model.
   A re-run whose inputs and export params are unchanged returns the existing export (idempotent).
2. Memory: parameter count (from the config, on the meta device) x copies needed, against free RAM
   and GPU memory; a machine that cannot hold the export is refused before anything loads.
3. Merge: the base in fp32 (never a quantized base: merging into rounded weights degrades quality),
   `PeftModel.from_pretrained(...).merge_and_unload()`; parity adapter-on-base vs merged (logits, greedy).
   Saved as safetensors + tokenizer + generation_config in export/merged/.
4. ONNX: one decoder graph with past/present KV cache (`transformers.exporters`, multi-token decode:
   prompt with an empty cache = prefill, then one token per step), dynamic batch and sequence, in
   export/onnx/ with the tokenizer and `onnx_layout.json` (see tasks/onnx_generate.py).
5. Parity PyTorch vs ONNX Runtime on a left-padded batch of eval prompts: prompt and per-step logits
   within `export.logits_atol`, greedy tokens identical. A failure raises ExportParityError.
6. Optional fp16 / int8 variants, each checked (top-1 agreement with fp32) and recorded.
7. Model card (README.md, also copied into merged/ and onnx/) and export_summary.json.

Everything is written into a temporary sibling of run_dir/export and renamed into place at the end,
so a failure (parity included) leaves no new export behind.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir, read_json
from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.plumbing.dataio import read_split
from tasks.plumbing.loading import resolve_base
from tasks.plumbing.onnx_generate import LAYOUT_FILE, LAYOUT_FORMAT, ProviderChoice, choose_provider
from tasks.plumbing.prompting import format_prompt

log = logging.getLogger("qa_lora.export")

# Bump when a change here changes what an export contains: a stored export made by older code is redone.
CODE_VERSION = "1"
SUMMARY_FILE = "export_summary.json"
CARD_FILE = "README.md"
ONNX_GRAPH = "model.onnx"
# Copies of the fp32 weights held in RAM at the peak: the torch model, the ONNX graph being built
# (its initializers), and the ONNX Runtime session of the parity check (loaded after torch is freed,
# but a variant conversion can hold one more). 10% headroom for activations and the allocator.
CPU_COPIES = 3.0
GPU_MERGE_COPIES = 1.2  # the base on the GPU, merged in place; LoRA weights and activations are small
HEADROOM = 1.1
_SAMPLE_QUESTIONS = ("What is ONNX?", "Why does a decoder keep a cache of keys and values between steps?")


class ExportParityError(UserError):
    """The exported model does not reproduce the PyTorch model within tolerance; nothing was exported."""


def export_model(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Merge the adapter into the base, export ONNX with a KV cache and check parity.

    Args:
        cfg: the effective configuration (`base`, `export`, `runtime` sections are used).
        run_dir: the run directory; reads train/adapter and data/eval.jsonl, writes export/.

    Returns:
        Paths of the export (merged/, onnx/, model card, summary), the provider, parity numbers and
        the input fingerprint; `reused` tells whether an identical earlier export was kept.

    Raises:
        UserError: missing inputs, a failed gate, a quantized base, too little memory, an unavailable
            provider.
        ExportParityError: merge or ONNX parity outside tolerance (the stage fails, nothing is written).
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    adapter_dir = run_dir / "train" / "adapter"
    eval_path = run_dir / "data" / "eval.jsonl"
    for need, what in (
        (adapter_dir / "adapter_config.json", "run `qa-lora train` first"),
        (eval_path, "run `qa-lora validate` first"),
    ):
        if not need.is_file():
            raise UserError(f"{need}: not found; {what}")
    gate = _maybe_json(run_dir / "eval" / "gate.json")
    if gate is not None and not gate.get("passed"):
        # `dvc repro` and `qa-lora export` reach here without the DAG's gate task: refuse the same way.
        reasons = "; ".join(gate.get("reasons") or []) or "see eval/gate.json"
        raise UserError(f"{run_dir / 'eval' / 'gate.json'}: the gate failed ({reasons}); nothing exported")
    questions = _parity_questions(eval_path, cfg.export.parity_prompts)
    base_src = resolve_base(cfg).ref
    fingerprint = _fingerprint(cfg, run_dir, base_src, adapter_dir, questions)

    final = run_dir / "export"
    reused = _reusable(final, fingerprint)
    if reused is not None:
        log.info("export: inputs unchanged (fingerprint %s); keeping %s", fingerprint, final)
        return _result(final, reused, reused=True)

    import onnxruntime as ort
    import torch

    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    choice = choose_provider(ort.get_available_providers(), cfg.export.provider)
    log.info("export: ONNX Runtime provider %s (%s)", choice.name, choice.reason)

    timings: dict[str, float] = {}
    with atomic_dir(final) as tmp:
        t = time.perf_counter()
        model_config = _load_base_config(cfg, base_src)
        memory = _plan_memory(
            _count_parameters(model_config),
            requested_device=cfg.runtime.device,
            cpu_available=_cpu_available(),
            gpu_available=_gpu_available(cfg.runtime.device),
        )
        log.info("export: %s", memory["reason"])

        tokenizer = _load_tokenizer(cfg, base_src, adapter_dir)
        prompts = [format_prompt(q) for q in questions]
        enc = tokenizer(prompts, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        gen_config = _generation_config(cfg, tokenizer)

        merged, merge_parity = _merge(
            cfg, base_src, adapter_dir, memory["merge_device"], ids, mask, gen_config
        )
        timings["merge_s"] = time.perf_counter() - t
        log.info(
            "export: merged on %s in %.1fs; merge parity max|dlogit|=%.3g, greedy identical=%s",
            memory["merge_device"],
            timings["merge_s"],
            merge_parity["max_abs_diff"],
            merge_parity["tokens_identical"],
        )
        _raise_if_failed("merge (adapter-on-base vs merged)", merge_parity, cfg.export.merge_atol)

        t = time.perf_counter()
        merged_dir = tmp / "merged"
        merged.generation_config = gen_config
        merged.save_pretrained(str(merged_dir))
        tokenizer.save_pretrained(str(merged_dir))
        timings["save_merged_s"] = time.perf_counter() - t

        # Reference for ONNX parity: the merged fp32 model on CPU (where the ONNX graph is traced).
        reference = _torch_greedy(merged, ids, mask, gen_config, cfg.export.parity_new_tokens)

        t = time.perf_counter()
        onnx_dir = tmp / "onnx"
        layout = _export_onnx(merged, tokenizer, gen_config, onnx_dir, cfg.export.opset)
        timings["export_onnx_s"] = time.perf_counter() - t
        log.info("export: ONNX graph written in %.1fs", timings["export_onnx_s"])
        del merged
        gc.collect()

        t = time.perf_counter()
        onnx_parity = _check_onnx_parity(
            onnx_dir, choice, prompts, ids.numpy(), mask.numpy(), reference, cfg.export.parity_new_tokens
        )
        timings["onnx_parity_s"] = time.perf_counter() - t
        log.info(
            "export: ONNX parity on %s: prompt max|dlogit|=%.3g, step max|dlogit|=%.3g, greedy identical=%s",
            onnx_parity["provider"],
            onnx_parity["prefill_max_abs_diff"],
            onnx_parity["step_max_abs_diff"],
            onnx_parity["tokens_identical"],
        )
        _raise_if_failed("ONNX (PyTorch vs ONNX Runtime, fp32)", onnx_parity, cfg.export.logits_atol)

        variants: dict[str, Any] = {}
        for name in cfg.export.variants:
            t = time.perf_counter()
            variants[name] = _export_variant(
                name, onnx_dir, choice, ids.numpy(), mask.numpy(), reference, cfg
            )
            variants[name]["seconds"] = round(time.perf_counter() - t, 3)
            log.info(
                "export: variant %s: %s",
                name,
                json.dumps({k: v for k, v in variants[name].items() if k != "files"}),
            )
        failed = [n for n, v in variants.items() if not v["passed"]]
        if failed:
            detail = "; ".join(f"{n}: top-1 agreement {variants[n]['top1_agreement']:.4f}" for n in failed)
            raise ExportParityError(
                f"export.variants: {detail} < export.variant_min_top1={cfg.export.variant_min_top1}; "
                "drop the variant or lower the threshold"
            )

        timings["total_s"] = time.perf_counter() - t_start
        summary = {
            "fingerprint": fingerprint,
            "code_version": CODE_VERSION,
            "base": {
                "name_or_path": cfg.base.name_or_path,
                "source": base_src,
                "revision": cfg.base.revision,
            },
            "adapter": str(adapter_dir),
            "params_hash": cfg.params_hash(),
            "opset": cfg.export.opset,
            "dtype": "float32",
            "provider": choice.to_dict(),
            "memory": memory,
            "parity": {
                "prompts": len(questions),
                "new_tokens": cfg.export.parity_new_tokens,
                "prompt_lengths": [int(n) for n in mask.sum(dim=1).tolist()],
                "merge": {**merge_parity, "atol": cfg.export.merge_atol},
                "onnx": {**onnx_parity, "atol": cfg.export.logits_atol},
            },
            "variants": variants,
            "layout": {k: layout[k] for k in ("graph", "num_layers", "num_key_value_heads", "head_dim")},
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "sizes_bytes": {"merged": _dir_size(merged_dir), "onnx_fp32": _graph_size(onnx_dir / ONNX_GRAPH)},
            "versions": _versions(),
        }
        card = _render_model_card(cfg, run_dir, summary)
        for where in (tmp, merged_dir, onnx_dir):
            (where / CARD_FILE).write_text(card, encoding="utf-8")
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    log.info("export: done in %.1fs -> %s", time.perf_counter() - t_start, final)
    return _result(final, summary, reused=False)


# ---------------------------------------------------------------------------------------------- inputs


def _parity_questions(path: Path, n: int) -> list[str]:
    """The first `n` eval questions in id order (stable across runs)."""
    rows = sorted((r["id"], r["question"]) for r in read_split(path, "eval split"))
    return [q for _, q in rows[:n]]


def _fingerprint(
    cfg: Config, run_dir: Path, base_src: str, adapter_dir: Path, questions: Sequence[str]
) -> str:
    """What decides the export's content: code, the whole effective config (the card quotes it), base,
    adapter bytes, parity prompts, and the lineage files the model card reads."""
    h = hashlib.sha256()
    h.update(json.dumps([CODE_VERSION, base_src, cfg.params_hash(), list(questions)]).encode())
    base = Path(base_src)
    if base.is_dir():  # a rebuilt base (new mtime) means a new export; hashing GBs of weights would be slow
        for f in sorted(base.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    files = sorted(f for f in adapter_dir.iterdir() if f.is_file())
    files += [run_dir / "version.json", run_dir / "eval" / "metrics.json", run_dir / "eval" / "gate.json"]
    for f in files:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest() if f.is_file() else b"missing")
    return h.hexdigest()[:16]


def _reusable(final: Path, fingerprint: str) -> dict[str, Any] | None:
    summary_path = final / SUMMARY_FILE
    if not summary_path.is_file():
        return None
    try:
        summary = read_json(summary_path)
    except (OSError, ValueError):
        return None
    needed = [
        final / "merged" / "config.json",
        final / "onnx" / ONNX_GRAPH,
        final / "onnx" / LAYOUT_FILE,
        final / CARD_FILE,
    ]
    if summary.get("fingerprint") != fingerprint or not all(p.is_file() for p in needed):
        return None
    return summary


def _load_base_config(cfg: Config, base_src: str) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        base_src, revision=cfg.base.revision, trust_remote_code=cfg.base.trust_remote_code
    )
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, Mapping) else type(quant).__name__
        raise UserError(
            f"base.name_or_path: {cfg.base.name_or_path} is a quantized checkpoint ({method}); merging into "
            "quantized weights degrades quality, point base.name_or_path at the full-precision model"
        )
    return config


def _load_tokenizer(cfg: Config, base_src: str, adapter_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))  # the one training used
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            base_src, revision=cfg.base.revision, trust_remote_code=cfg.base.trust_remote_code
        )
    if tokenizer.eos_token_id is None:
        raise UserError(f"{adapter_dir}: the tokenizer has no EOS token; generation could never stop")
    if tokenizer.pad_token_id is None:
        # Hub Llamas ship without a pad token; with an attention mask any id is safe for padding.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batches: the last position is the next-token one
    return tokenizer


def _generation_config(cfg: Config, tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=cfg.eval.max_new_tokens,
    )


# ---------------------------------------------------------------------------------------------- memory


def _plan_memory(
    n_params: int,
    requested_device: str,
    cpu_available: int,
    gpu_available: int | None,
) -> dict[str, Any]:
    """Decide where to merge and refuse a machine that cannot hold the export (pure: numbers in).

    Args:
        n_params: parameter count of the base model.
        requested_device: `runtime.device` ("auto", "cpu", "cuda").
        cpu_available: free RAM in bytes.
        gpu_available: free memory of GPU 0 in bytes, or None without a GPU.

    Returns:
        Bytes needed and available, the merge device and the reason.

    Raises:
        UserError: the RAM cannot hold the fp32 weights CPU_COPIES times over (ONNX export runs on CPU).
    """
    weights = n_params * 4  # fp32: merging is done at full precision
    cpu_need = int(weights * CPU_COPIES * HEADROOM)
    gpu_need = int(weights * GPU_MERGE_COPIES * HEADROOM)
    gib = 2**30
    if cpu_need > cpu_available:
        raise UserError(
            f"export: the fp32 model ({n_params / 1e9:.2f}B parameters, {weights / gib:.1f} GiB) needs about "
            f"{cpu_need / gib:.1f} GiB of free RAM to merge and export ({CPU_COPIES:g} copies + 10%), but only "
            f"{cpu_available / gib:.1f} GiB is free; run the export stage on a larger machine"
        )
    device = "cpu"
    reason = f"fp32 weights {weights / gib:.2f} GiB; RAM need {cpu_need / gib:.2f} of {cpu_available / gib:.2f} GiB free"
    if requested_device in ("auto", "cuda") and gpu_available is not None:
        if gpu_need <= gpu_available:
            device = "cuda"
            reason += f"; merge on GPU (need {gpu_need / gib:.2f} of {gpu_available / gib:.2f} GiB free)"
        else:
            reason += (
                f"; merge on CPU: GPU has {gpu_available / gib:.2f} GiB free, needs {gpu_need / gib:.2f}"
            )
    else:
        reason += "; merge on CPU"
    return {
        "n_params": int(n_params),
        "weights_bytes": int(weights),
        "cpu_need_bytes": cpu_need,
        "cpu_available_bytes": int(cpu_available),
        "gpu_need_bytes": gpu_need,
        "gpu_available_bytes": None if gpu_available is None else int(gpu_available),
        "merge_device": device,
        "reason": reason,
    }


def _count_parameters(config: Any) -> int:
    """Parameter count without loading weights: the architecture built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _cpu_available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _gpu_available(requested: str) -> int | None:
    import torch

    if requested == "cpu" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


# ----------------------------------------------------------------------------------------------- merge


def _merge(
    cfg: Config, base_src: str, adapter_dir: Path, device: str, ids: Any, mask: Any, gen_config: Any
) -> tuple[Any, dict[str, Any]]:
    """fp32 base + adapter -> merged model on CPU, with adapter-on-base vs merged parity."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_src,
        dtype=torch.float32,
        revision=cfg.base.revision,
        trust_remote_code=cfg.base.trust_remote_code,
        use_safetensors=None if cfg.base.allow_pickle_weights else True,
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir)).to(device).eval()
    d_ids, d_mask = ids.to(device), mask.to(device)
    before = _torch_greedy(model, d_ids, d_mask, gen_config, cfg.export.parity_new_tokens)
    merged = model.merge_and_unload().eval()
    after = _torch_greedy(merged, d_ids, d_mask, gen_config, cfg.export.parity_new_tokens)
    parity = _compare(before, after, mask.numpy())
    merged = merged.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()
    return merged, parity


def _torch_greedy(model: Any, ids: Any, mask: Any, gen_config: Any, max_new_tokens: int) -> dict[str, Any]:
    """Prompt logits, per-step logits and greedy tokens of a PyTorch model (generate(), as users call it)."""
    import copy

    import numpy as np
    import torch

    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    config = copy.deepcopy(gen_config)
    config.max_new_tokens = max_new_tokens
    with torch.inference_mode():
        prefill = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[:, ids.shape[1] :].cpu().numpy()
    eos = gen_config.eos_token_id
    return {
        "prefill_logits": prefill.float().cpu().numpy(),
        "step_logits": np.stack([s.float().cpu().numpy() for s in out.logits]),
        "token_ids": [row[: row.index(eos) + 1] if eos in row else row for row in new.tolist()],
    }


def _compare(ref: Mapping[str, Any], got: Mapping[str, Any], mask: Any) -> dict[str, Any]:
    """Max |logit difference| over real (unpadded) prompt positions and over steps while a row is
    still generating in the reference; greedy tokens compared per prompt."""
    import numpy as np

    real = np.asarray(mask) == 1
    prefill = float(np.abs(ref["prefill_logits"] - got["prefill_logits"])[real].max())
    step = 0.0
    n_steps = min(len(ref["step_logits"]), len(got["step_logits"]))
    for s in range(n_steps):
        active = [i for i, toks in enumerate(ref["token_ids"]) if len(toks) > s]
        if active:
            step = max(
                step, float(np.abs(ref["step_logits"][s][active] - got["step_logits"][s][active]).max())
            )
    mismatched = [
        i for i, (a, b) in enumerate(zip(ref["token_ids"], got["token_ids"], strict=True)) if a != b
    ]
    return {
        "max_abs_diff": max(prefill, step),
        "prefill_max_abs_diff": prefill,
        "step_max_abs_diff": step,
        "tokens_identical": not mismatched,
        "mismatched_prompts": mismatched,
        "generated_tokens": int(sum(len(t) for t in ref["token_ids"])),
    }


def _raise_if_failed(what: str, parity: Mapping[str, Any], atol: float) -> None:
    problems = []
    if not parity["max_abs_diff"] <= atol:  # `not <=` so that NaN fails too
        problems.append(f"max |logit diff| {parity['max_abs_diff']:.3g} > atol {atol:g}")
    if not parity["tokens_identical"]:
        problems.append(f"greedy tokens differ on prompts {parity['mismatched_prompts']}")
    if problems:
        raise ExportParityError(f"{what} parity failed: {'; '.join(problems)}; nothing was exported")


# ------------------------------------------------------------------------------------------------ onnx


def _export_onnx(model: Any, tokenizer: Any, gen_config: Any, out_dir: Path, opset: int) -> dict[str, Any]:
    """One decoder graph with past/present KV cache, dynamic batch and sequence, + tokenizer + layout.

    `transformers.exporters` captures the forward calls of a real `generate()`; with
    `multi_token_decode` its decode component keeps the query axis symbolic, so the same graph runs the
    prompt on an empty cache and then one token per step (no duplicate prefill graph and weights).
    The sample is a batch of 2 prompts of different lengths: a batch of 1 would fix the batch axis.
    """
    import onnxruntime as ort
    from transformers.exporters import OnnxConfig, OnnxExporter
    from transformers.exporters.utils import decompose_prefill_decode

    out_dir.mkdir(parents=True, exist_ok=True)
    sample = dict(tokenizer([format_prompt(q) for q in _SAMPLE_QUESTIONS], padding=True, return_tensors="pt"))
    stages = decompose_prefill_decode(model, sample, generation_config=gen_config, multi_token_decode=True)
    decode_model, decode_inputs = stages["decode"]
    with _quiet():
        exported = OnnxExporter().export(
            decode_model, decode_inputs, OnnxConfig(dynamic=True, opset_version=opset)
        )
    OnnxExporter.save_program(exported.program, out_dir / ONNX_GRAPH)
    del exported, stages
    gc.collect()
    model.config.save_pretrained(str(out_dir))
    gen_config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))

    # The layout is read back from the saved graph, not assumed from the exporter's naming.
    session = ort.InferenceSession(str(out_dir / ONNX_GRAPH), providers=["CPUExecutionProvider"])
    layout = _layout(session, model.config, tokenizer, opset)
    del session
    (out_dir / LAYOUT_FILE).write_text(json.dumps(layout, indent=2) + "\n", encoding="utf-8")
    return layout


def _layout(session: Any, config: Any, tokenizer: Any, opset: int) -> dict[str, Any]:
    import re

    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    standard = ("input_ids", "attention_mask", "position_ids")
    missing = [n for n in standard if n not in inputs] + ([] if "logits" in outputs else ["logits"])
    if missing:
        raise RuntimeError(f"exported graph lacks {missing}; inputs {inputs}, outputs {outputs}")
    pattern = re.compile(r"layers\.(\d+)\.(keys|values)$")

    def keyed(names: Sequence[str]) -> dict[tuple[int, str], str]:
        found = {}
        for name in names:
            m = pattern.search(name)
            if m:
                found[(int(m.group(1)), m.group(2))] = name
        return found

    cache_in, cache_out = (
        keyed([n for n in inputs if n not in standard]),
        keyed([n for n in outputs if n != "logits"]),
    )
    n_layers = int(config.num_hidden_layers)
    expected = {(layer, kind) for layer in range(n_layers) for kind in ("keys", "values")}
    if set(cache_in) != expected or set(cache_out) != expected:
        raise RuntimeError(
            f"exported graph's cache tensors do not pair up per layer: inputs {inputs}, outputs {outputs}"
        )
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return {
        "format": LAYOUT_FORMAT,
        "graph": ONNX_GRAPH,
        "opset": opset,
        "dtype": "float32",
        "inputs": {n: n for n in standard},
        "logits": "logits",
        "cache": [
            {
                "layer": layer,
                "kind": kind,
                "input": cache_in[(layer, kind)],
                "output": cache_out[(layer, kind)],
            }
            for layer in range(n_layers)
            for kind in ("keys", "values")
        ],
        "cache_shape": ["batch", heads, "past_sequence", head_dim],
        "num_layers": n_layers,
        "num_key_value_heads": heads,
        "head_dim": head_dim,
        "vocab_size": int(config.vocab_size),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "padding_side": "left",
        "usage": (
            "prefill: run the graph on the left-padded prompt with every cache input of shape "
            "(batch, heads, 0, head_dim); decode: feed one token, the cache outputs of the previous call, "
            "the attention mask grown by one column of ones; position_ids = cumsum(attention_mask) - 1, "
            "0 at padding (see tasks/onnx_generate.py)"
        ),
    }


def _check_onnx_parity(
    onnx_dir: Path,
    choice: ProviderChoice,
    prompts: Sequence[str],
    ids: Any,
    mask: Any,
    reference: Mapping[str, Any],
    max_new_tokens: int,
) -> dict[str, Any]:
    """The exported graph, as a consumer loads it (tokenizer from onnx/), vs the PyTorch reference."""
    import numpy as np

    from tasks.plumbing.onnx_generate import OnnxGenerator

    gen = OnnxGenerator(onnx_dir, provider=choice.name)
    check_ids, check_mask = gen.encode(prompts)
    if not (np.array_equal(check_ids, ids) and np.array_equal(check_mask, mask)):
        raise ExportParityError(
            f"{onnx_dir}: the saved tokenizer encodes the parity prompts differently; nothing was exported"
        )
    result = gen.generate_ids(ids, mask, max_new_tokens, return_logits=True)
    got = {
        "prefill_logits": result.prefill_logits,
        "step_logits": result.step_logits,
        "token_ids": result.token_ids,
    }
    return {**_compare(reference, got, mask), "provider": gen.provider}


# -------------------------------------------------------------------------------------------- variants


def _export_variant(
    name: str,
    onnx_dir: Path,
    choice: ProviderChoice,
    ids: Any,
    mask: Any,
    reference: Mapping[str, Any],
    cfg: Config,
) -> dict[str, Any]:
    """fp16 (weights and compute in half, fp32 inputs/outputs) or int8 (dynamic weight quantization),
    in onnx/<name>/, checked against fp32 by teacher-forced top-1 agreement on prompt + greedy answer."""
    import numpy as np
    import onnx

    from tasks.plumbing.onnx_generate import OnnxGenerator

    src = onnx_dir / ONNX_GRAPH
    out = onnx_dir / name / ONNX_GRAPH
    out.parent.mkdir(parents=True, exist_ok=True)
    if name == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet():
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, use_external_data_format=True)
    elif name == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(out), save_as_external_data=True, location=f"{ONNX_GRAPH}.data")
        del model
    else:  # the config's Literal makes this unreachable; kept for a clear message if it grows
        raise UserError(f"export.variants: unknown variant {name!r}; expected fp16 or int8")

    fp32 = OnnxGenerator(onnx_dir, provider=choice.name)
    variant = OnnxGenerator(
        onnx_dir, provider=choice.name, graph=f"{name}/{ONNX_GRAPH}", tokenizer=fp32.tokenizer
    )
    # Teacher forcing: both graphs score the same sequences (prompt + fp32 greedy answer), so one early
    # disagreement does not cascade into every later position as free-running decoding would.
    seqs = [
        [t for t, m in zip(row, mrow, strict=True) if m] + list(gen)
        for row, mrow, gen in zip(ids.tolist(), mask.tolist(), reference["token_ids"], strict=True)
    ]
    width = max(len(s) for s in seqs)
    full = np.array([[fp32.pad_token_id] * (width - len(s)) + s for s in seqs], dtype=np.int64)
    full_mask = np.array([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=np.int64)
    pos = np.maximum(np.cumsum(full_mask, axis=-1) - 1, 0) * full_mask
    a, _ = fp32.forward(full, full_mask, pos, fp32.empty_cache(len(seqs)))
    b, _ = variant.forward(full, full_mask, pos, variant.empty_cache(len(seqs)))
    real = full_mask == 1
    agree = float((a.argmax(-1) == b.argmax(-1))[real].mean())
    greedy = variant.generate_ids(ids, mask, cfg.export.parity_new_tokens)
    same = sum(x == y for x, y in zip(greedy.token_ids, reference["token_ids"], strict=True))
    return {
        "path": f"onnx/{name}/{ONNX_GRAPH}",
        "provider": variant.provider,
        "top1_agreement": agree,
        "min_top1": cfg.export.variant_min_top1,
        "max_abs_diff": float(np.abs(a - b)[real].max()),
        "greedy_identical_rate": same / len(seqs),
        "size_bytes": _graph_size(out),
        "passed": agree >= cfg.export.variant_min_top1,
    }


# ------------------------------------------------------------------------------------------ model card


def _render_model_card(cfg: Config, run_dir: Path, summary: Mapping[str, Any]) -> str:
    """The model card (Markdown): what the model is, its lineage, quality, limits and how to load it.

    Inputs a run may lack (version.json, eval/metrics.json, eval/gate.json) are stated as missing.
    """
    run_dir = Path(run_dir)
    version = _maybe_json(run_dir / "version.json")
    metrics = _maybe_json(run_dir / "eval" / "metrics.json")
    gate = _maybe_json(run_dir / "eval" / "gate.json")
    adapter = _maybe_json(run_dir / "train" / "adapter" / "adapter_config.json") or {}
    parity = summary.get("parity", {})
    onnx_p, merge_p = parity.get("onnx", {}), parity.get("merge", {})
    train = cfg.train
    # The adapter's own config is what was trained; params.yaml only says what was asked for.
    lora = {
        "r": adapter.get("r", cfg.lora.r),
        "alpha": adapter.get("lora_alpha", cfg.lora.alpha),
        "dropout": adapter.get("lora_dropout", cfg.lora.dropout),
        "targets": sorted(adapter["target_modules"])
        if isinstance(adapter.get("target_modules"), list)
        else list(cfg.lora.target_modules),
    }
    lines = [
        f"# {cfg.register.model_name}: Q&A model (LoRA fine-tune of {cfg.base.name_or_path}, merged)",
        "",
        "## Lineage",
        f"- Base model: `{cfg.base.name_or_path}`"
        + (f" (revision `{cfg.base.revision}`)" if cfg.base.revision else ""),
    ]
    if version and version.get("dataset_hash"):
        lines.append(
            f"- Data version (DVC): `{version['dataset_hash']}`"
            + (f", remote `{version['remote']}`" if version.get("remote") else "")
        )
    else:
        lines.append(
            f"- Data version (DVC): not available ({run_dir / 'version.json'} missing or without dataset_hash)"
        )
    lines += [
        f"- Params hash: `{cfg.params_hash()}` (effective config of this run: params.effective.yaml)",
        f"- Export fingerprint: `{summary.get('fingerprint', '?')}`",
        "",
        "## Parameters (highlights)",
        f"- LoRA ({'adapter_config.json' if adapter else 'params'}): r={lora['r']}, alpha={lora['alpha']}, "
        f"dropout={lora['dropout']}, target modules {', '.join(lora['targets'])}",
        f"- Training: epochs={train.num_train_epochs}, max_steps={train.max_steps}, lr={train.learning_rate}, "
        f"schedule={train.lr_scheduler_type}, batch={train.per_device_train_batch_size}x{train.gradient_accumulation_steps}, "
        f"max_length={train.max_length}, seed={train.seed}",
        "- Prompt template: `<s>[INST] {question} [/INST]`; the answer ends with `</s>`",
        "",
        "## Evaluation",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _flatten_numbers(metrics)]
    else:
        lines.append(f"- Metrics: not available ({run_dir / 'eval' / 'metrics.json'} missing)")
    lines.append("")
    if gate:
        decision = gate.get("decision") or ("pass" if gate.get("passed") else "fail")
        lines.append(f"- Regression gate: **{decision}** (primary metric {gate.get('primary_metric', '?')})")
        lines += [f"  - {r}" for r in gate.get("reasons") or []]
    else:
        lines.append(f"- Regression gate: not available ({run_dir / 'eval' / 'gate.json'} missing)")
    lines += [
        "",
        "## Export",
        f"- Merged: fp32 safetensors in `merged/` (adapter merged with PEFT `merge_and_unload`); merge parity "
        f"max |logit diff| {merge_p.get('max_abs_diff', float('nan')):.3g}, greedy identical: {merge_p.get('tokens_identical')}",
        f"- ONNX: `onnx/{ONNX_GRAPH}`, opset {summary.get('opset')}, one decoder graph with KV cache (past/present), "
        "dynamic batch and sequence; layout in `onnx/onnx_layout.json`",
        f"- Parity PyTorch vs ONNX Runtime ({onnx_p.get('provider', '?')}, {parity.get('prompts', '?')} eval prompts, "
        f"{parity.get('new_tokens', '?')} new tokens): max |logit diff| {onnx_p.get('max_abs_diff', float('nan')):.3g} "
        f"(atol {onnx_p.get('atol')}), greedy identical: {onnx_p.get('tokens_identical')}",
    ]
    for name, v in (summary.get("variants") or {}).items():
        lines.append(
            f"- Variant {name}: `{v['path']}`, top-1 agreement with fp32 {v['top1_agreement']:.4f} (min {v['min_top1']})"
        )
    lines += [
        "",
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
        'enc = tok(["[INST] What does zip() return? [/INST]"], return_tensors="pt")',
        "out = model.generate(**enc, max_new_tokens=64, do_sample=False)",
        'print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "With ONNX Runtime (no torch needed; provider auto: MIGraphX, ROCm, CUDA, CPU):",
        "```python",
        "from tasks.plumbing.onnx_generate import load_onnx_generator",
        "from tasks.plumbing.prompting import format_prompt",
        'gen = load_onnx_generator("onnx")',
        'print(gen.generate([format_prompt("What does zip() return?")], max_new_tokens=64).texts[0])',
        "```",
        "",
    ]
    return "\n".join(lines)


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


# --------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence INFO lines of the ONNX tool chain (one per deduplicated initializer or quantized tensor,
    thousands for a 7B model; the quantizer logs on the root logger) while keeping warnings."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _graph_size(graph: Path) -> int:
    data = graph.with_name(graph.name + ".data")
    return graph.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def _result(final: Path, summary: Mapping[str, Any], reused: bool) -> dict[str, Any]:
    onnx_p = summary["parity"]["onnx"]
    return {
        "export_dir": str(final),
        "merged_dir": str(final / "merged"),
        "onnx_dir": str(final / "onnx"),
        "model_card": str(final / CARD_FILE),
        "summary": str(final / SUMMARY_FILE),
        "fingerprint": summary["fingerprint"],
        "provider": summary["provider"]["name"],
        "onnx_max_abs_diff": onnx_p["max_abs_diff"],
        "tokens_identical": onnx_p["tokens_identical"],
        "variants": {k: v["passed"] for k, v in (summary.get("variants") or {}).items()},
        "reused": reused,
    }
