"""Scoring one model on the eval rows: load it, teacher-forced answer loss, greedy answers, per-row scores,
its loss on general text and its lm-evaluation-harness tasks (while it is loaded).

No caching here (the stage decides what to reuse, see `stage._reuse_or_score`) and no gate: this module
turns (model, rows) into one result dict per row, in the rows' order.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.plumbing.chat import ChatFormat, chat_format
from tasks.plumbing.harness import harness_scores
from tasks.plumbing.loading import hub_kwargs, load_tokenizer
from tasks.stages.evaluate.metrics import score_row

log = logging.getLogger("qa_lora.evaluate")


@dataclass(frozen=True)
class ModelSpec:
    """One model to score.

    Attributes:
        role: "base", "candidate" or "champion" (names the model in logs, timings and outputs).
        src: what `from_pretrained` takes: a local model directory or a hub id.
        adapter: a LoRA adapter directory merged into `src` before scoring, or None.
        tokenizer_dir: a directory whose saved tokenizer wins over the base's (the adapter's copy, the
            champion's merged model), or None for the base's.
        pinned: load `src` with the base's hub pins (revision, remote-code policy); only the base is a
            hub model, the champion is a downloaded directory.
    """

    role: str
    src: str
    adapter: Path | None = None
    tokenizer_dir: Path | None = None
    pinned: bool = True


def plan_eval_device(cfg: Config, trained: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(device, torch dtype name) the models are scored with: the precision the candidate trained in.

    The device plan's rule (bf16 where the hardware has it natively, else fp32; fp16 only when asked),
    except where `train.precision: auto` was measured on this kind of device: then the measured choice
    from the train summary, so that a candidate trained in fp32 because fp32 measured faster (the tiny
    base on an AMX CPU) is not scored in bf16. A summary from another kind of device (trained on a GPU
    node, evaluated on a CPU worker) does not decide here.

    Args:
        cfg: the pipeline configuration.
        trained: the run's train summary (train_summary.json), or None when there is none.
    """
    from tasks.plumbing.device import detect_capabilities, plan_device

    caps = detect_capabilities(cfg.runtime.device)
    trained = trained or {}
    verdict = trained.get("precision_verdict")
    precision = cfg.train.precision  # as the train stage does: a measured verdict enters the plan as a choice
    if precision == "auto" and verdict and (trained.get("device") or {}).get("backend") == caps.backend:
        precision = verdict.get("choice") or precision
    plan = plan_device(caps, precision=precision)
    return plan.device, {"bf16": "bfloat16", "fp16": "float16"}.get(plan.precision, "float32")


@dataclass(frozen=True)
class Scored:
    """What scoring one model produced.

    Attributes:
        results: one dict per row (id, category, prediction, the answer metrics, EOS/empty flags, token
            and word counts, the answer tokens' summed NLL).
        timings: {"<role>_load_s", "<role>_loss_s", "<role>_generate_s", "<role>_harness_s"}.
        documents: per general document (summed NLL, tokens).
        harness: per harness task, `plumbing.harness.harness_scores`' result ({} when not run).
    """

    results: list[dict[str, Any]]
    timings: dict[str, float]
    documents: list[tuple[float, int]]
    harness: dict[str, dict[str, Any]]


def score_model(
    cfg: Config,
    spec: ModelSpec,
    rows: Sequence[Mapping[str, str]],
    on: tuple[str, str],
    documents: Sequence[str] = (),
    harness: bool = False,
) -> Scored:
    """Score one model on `rows` (and on `documents`, and the harness tasks when `harness`).

    Args:
        on: (device, torch dtype name).
        documents: general texts for the forgetting rule (general.py); none: not scored.
        harness: run `eval.harness_tasks` on the loaded model (harness.py's rule).
    """
    device, dtype = on
    e = cfg.eval
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg, spec, device, dtype)
    chat = chat_format(cfg, tokenizer)
    t1 = time.perf_counter()
    losses = answer_losses(model, chat, rows, e.batch_size, device)
    t2 = time.perf_counter()
    generations = generate(model, chat, rows, e.batch_size, e.max_new_tokens, device)
    t3 = time.perf_counter()
    docs = document_losses(model, chat.tokenizer, documents, e.batch_size, e.general_max_tokens, device)
    t4 = time.perf_counter()
    tasks: dict[str, dict[str, Any]] = {}
    if harness:
        with tempfile.TemporaryDirectory(prefix="qa-lora-harness-") as scratch:
            tasks = harness_scores(model, tokenizer, cfg, rows, Path(scratch))
    t5 = time.perf_counter()
    del model
    gc.collect()
    out = [_row_result(row, loss, gen) for row, loss, gen in zip(rows, losses, generations, strict=True)]
    log.info(
        "%s: scored %d rows (load %.1fs, loss %.1fs, generate %.1fs, harness %.1fs)",
        spec.role,
        len(out),
        t1 - t0,
        t2 - t1,
        t3 - t2,
        t5 - t4,
    )
    timings = {
        f"{spec.role}_load_s": round(t1 - t0, 2),
        f"{spec.role}_loss_s": round(t2 - t1, 2),
        f"{spec.role}_generate_s": round(t3 - t2, 2),
        f"{spec.role}_harness_s": round(t5 - t4, 2),
    }
    return Scored(out, timings, docs, tasks)


def document_losses(
    model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int, max_tokens: int, device: str
) -> list[tuple[float, int]]:
    """(summed NLL, predicted tokens) per text: its first `max_tokens` tokens as the base was pretrained on
    them (the tokenizer's own special tokens), each token predicted from the ones before it."""
    import torch
    import torch.nn.functional as F

    out: list[tuple[float, int]] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "right"  # generation pads left
    try:
        for start in range(0, len(texts), batch_size):
            part = list(texts[start : start + batch_size])
            enc = tokenizer(part, truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                nll = F.cross_entropy(
                    logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none"
                )
            sums, counts = nll.sum(1).cpu().tolist(), (labels != -100).sum(1).cpu().tolist()
            out += [(float(a), int(b)) for a, b in zip(sums, counts, strict=True)]
    finally:
        tokenizer.padding_side = side
    return out


def _row_result(row: Mapping[str, str], loss: tuple[float, int], gen: Mapping[str, Any]) -> dict[str, Any]:
    pred = gen["prediction"]
    return {
        "id": row["id"],
        "category": row["category"],
        "prediction": pred,
        **score_row(pred, row["answer"]),
        "ended_with_eos": gen["ended_with_eos"],
        "empty": not pred.strip(),
        "gen_tokens": gen["gen_tokens"],
        "pred_words": len(pred.split()),
        "ref_words": len(row["answer"].split()),
        "nll_sum": loss[0],
        "n_answer_tokens": loss[1],
    }


def load_model(cfg: Config, spec: ModelSpec, device: str, dtype: str) -> tuple[Any, Any]:
    """The model in eval mode on `device` (an adapter merged in: faster, same math) and its tokenizer.

    The tokenizer comes from the one loader (`tasks.plumbing.loading.load_tokenizer`), so evaluation
    tokenizes and pads exactly as training and export do.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    model = AutoModelForCausalLM.from_pretrained(
        spec.src,
        dtype=getattr(torch, dtype),
        use_safetensors=None if cfg.base.allow_pickle_weights else True,
        **(hub_kwargs(cfg) if spec.pinned else {}),
    )
    if spec.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(spec.adapter)).merge_and_unload()
    tokenizer = load_tokenizer(cfg, spec.tokenizer_dir, padding_side="left")
    model.to(device).eval()
    return model, tokenizer


def _answer_sequences(chat: ChatFormat, rows: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], int]]:
    """Per row, (the rendered example's token ids, where the last answer starts).

    The answer starts where the tokenized prompt and the tokenized example diverge, as TRL's SFTTrainer
    builds the completion mask for prompt/completion data; it runs to the end-of-turn token.
    """
    seqs: list[tuple[list[int], int]] = []
    for (full, _), p_ids in zip(chat.encode(rows), chat.prompt_ids(rows), strict=True):
        common = 0
        for a, b in zip(p_ids, full, strict=False):
            if a != b:
                break
            common += 1
        seqs.append((full, common))
    return seqs


def answer_losses(
    model: Any, chat: ChatFormat, rows: Sequence[Mapping[str, str]], batch_size: int, device: str
) -> list[tuple[float, int]]:
    """(sum of NLL, number of tokens) over each row's answer tokens, teacher-forced.

    The loss here is the training loss on held-out rows (the answer text and its end-of-turn token, never
    the prompt).
    Batches are right-padded; rows are sorted by length so a batch wastes little padding.
    """
    import torch
    import torch.nn.functional as F

    seqs = _answer_sequences(chat, rows)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(seqs[i][0]))
    pad = chat.tokenizer.pad_token_id
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(seqs[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                full, common = seqs[i]
                ids[j, : len(full)] = torch.tensor(full)
                mask[j, : len(full)] = 1
                labels[j, common : len(full)] = torch.tensor(full[common:])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            nll = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels[:, 1:].to(device), ignore_index=-100, reduction="none"
            )
            counts = (labels[:, 1:] != -100).sum(dim=1)
            sums = nll.sum(dim=1).cpu()
            for j, i in enumerate(idx):
                out[i] = (float(sums[j]), int(counts[j]))
    return out


def generate(
    model: Any,
    chat: ChatFormat,
    rows: Sequence[Mapping[str, str]],
    batch_size: int,
    max_new_tokens: int,
    device: str,
) -> list[dict[str, Any]]:
    """Greedy answers, batched with left padding (prompts sorted by length), KV cache on; a row stops at
    any of the chat format's stop tokens (its end-of-turn token, EOS).

    Returns:
        Per row {"prediction" (text before the stop token), "ended_with_eos" (it stopped), "gen_tokens"},
        in the rows' order.
    """
    import torch
    from transformers import GenerationConfig

    tokenizer, stops, pad = chat.tokenizer, list(chat.stop_token_ids), chat.tokenizer.pad_token_id
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad, use_cache=True
    )
    prompts = chat.prompt_ids(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))
    out: list[dict[str, Any]] = [{}] * len(rows)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                p = prompts[i]
                ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            seqs = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg
            )
            for j, i in enumerate(idx):
                out[i] = _decoded(tokenizer, seqs[j, width:].cpu().tolist(), stops)
    return out


def _decoded(tokenizer: Any, tokens: list[int], stops: list[int]) -> dict[str, Any]:
    at = next((k for k, t in enumerate(tokens) if t in stops), None)
    ended = at is not None
    tokens = tokens[:at] if ended else tokens
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return {"prediction": text, "ended_with_eos": ended, "gen_tokens": len(tokens)}
