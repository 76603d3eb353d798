"""`qa-lora evaluate`: score the base, the candidate and the champion on the held-out rows; the gate.

Readable top to bottom:
  eval rows -> per model (cached): answer-token loss + greedy answers -> per-row scores
  -> paired bootstrap CIs (candidate - base, candidate - champion), overall and per category
  -> gate rules (tasks/metrics.py) -> run_dir/eval/{metrics.json, gate.json, eval_report.md,
     comparison.png, predictions.jsonl, slices.json, plots/} written as one atomic directory.

The gate's result is data: a failing gate is written to gate.json and logged as a WARNING with its
reasons; this stage does not raise for it (the DAG decides what a failed gate stops).

Per-model results are cached under `eval.cache_dir`, keyed by the model's content fingerprint (base
weights, adapter, or the champion's merged weights), a hash of the eval rows, the prompt template and
the generation settings, so the base and the champion are not re-scored every run.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import importlib
import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir, read_json, write_json_atomic
from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.plumbing.dataio import read_split
from tasks.plumbing.loading import resolve_base
from tasks.plumbing.prompting import format_completion, format_prompt
from tasks.stages.evaluate.metrics import (
    ROW_METRICS,
    aggregate,
    bootstrap_ci,
    decide_gate,
    metric_array,
    score_row,
)

log = logging.getLogger("qa_lora.evaluate")

# Bump when a change here changes per-row results (scoring, decoding): older cache entries are ignored.
CACHE_VERSION = "1"
MODELS = ("base", "candidate", "champion")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".jinja")
_USE_REGISTRY: Any = object()  # sentinel: ask the registry for the champion


# The per-model numbers shown side by side (models.csv for `dvc plots`, and the report's table).
TABLE_COLUMNS = (
    "exact_match",
    "token_f1",
    "rouge_l",
    "loss",
    "perplexity",
    "eos_rate",
    "empty_rate",
    "answer_words_mean",
)


def evaluate_candidate(cfg: Config, run_dir: Path, *, _champion: Any = _USE_REGISTRY) -> dict[str, Any]:
    """Score base, candidate and champion on the eval split and apply the regression gate.

    Args:
        cfg: the pipeline configuration (sections `eval`, `gate`, `base`, `register`, `runtime`).
        run_dir: the run directory; reads `data/eval.jsonl` and `train/adapter/`, writes `eval/`.
        _champion: tests only: a champion record ({"version", "run_id", "merged_path", ...}) or None,
            instead of asking the registry.

    Returns:
        {"passed", "decision", "primary_metric", "candidate", "base", "champion" (key metrics),
         "champion_version", "reasons", "wall_s", "cache", "paths"}.

    Raises:
        UserError: the eval split or the adapter is missing or malformed.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    rows = _load_eval_rows(run_dir / "data" / "eval.jsonl", cfg.eval.max_rows)
    adapter_dir = run_dir / "train" / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; run `qa-lora train` first")
    log.info("evaluating on %d eval rows (%d categories)", len(rows), len({r["category"] for r in rows}))

    cache_root = cfg.resolve(cfg.eval.cache_dir) if cfg.eval.cache_dir else None
    timings: dict[str, float] = {}
    cache_state: dict[str, str] = {}
    with ExitStack() as stack:
        if _champion is _USE_REGISTRY:
            dest = (
                cache_root.parent / "champion"
                if cache_root
                else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qa-lora-champion-")))
            )
            champion = _fetch_champion(cfg, dest)
        else:
            champion = _champion
        if champion is not None and not Path(champion["merged_path"]).is_dir():
            raise UserError(
                f"champion version {champion.get('version')}: merged model {champion['merged_path']} "
                "is not a directory"
            )

        scorer = _Scorer(cfg, rows, cache_root)
        base_src = resolve_base(cfg).ref
        results: dict[str, list[dict[str, Any]] | None] = {}
        results["base"] = scorer.run("base", base_src, None, timings, cache_state)
        results["candidate"] = scorer.run("candidate", base_src, adapter_dir, timings, cache_state)
        results["champion"] = (
            scorer.run("champion", str(champion["merged_path"]), None, timings, cache_state)
            if champion is not None
            else None
        )

    g = cfg.gate
    gate = decide_gate(
        results["candidate"],  # type: ignore[arg-type]
        results["base"],  # type: ignore[arg-type]
        results["champion"],
        primary_metric=g.primary_metric,
        primary_metrics=cfg.eval.primary_metrics,
        min_improvement=g.min_improvement,
        max_regression=g.max_regression,
        min_slice_size=g.min_slice_size,
        min_eos_rate=g.min_eos_rate,
        max_empty_rate=g.max_empty_rate,
        regression_test=g.regression_test,
        samples=cfg.eval.bootstrap_samples,
        confidence=cfg.eval.confidence,
        seed=cfg.eval.seed,
        champion_version=str(champion["version"]) if champion else None,
    )
    summary = {m: (aggregate(r) if r is not None else None) for m, r in results.items()}
    model_cis = _model_cis(cfg, results)
    timings["total_s"] = round(time.perf_counter() - started, 2)
    eval_dir = _write_outputs(cfg, run_dir, rows, results, summary, gate, model_cis, champion, timings)

    metrics = sorted({*cfg.eval.primary_metrics, g.primary_metric, "eos_rate", "empty_rate", "loss"})
    key = {
        m: ({k: _finite(summary[m][k]) for k in metrics} if summary[m] is not None else None) for m in MODELS
    }
    if gate["passed"]:
        log.info(
            "gate PASSED: %s", "; ".join(r["detail"] for r in gate["rules"] if r["name"].startswith("beats"))
        )
    else:
        log.warning(
            "GATE FAILED (%d rule(s)); downstream must not promote this candidate:", len(gate["reasons"])
        )
        for reason in gate["reasons"]:
            log.warning("  gate: %s", reason)
    log.info("eval finished in %.1fs (cache: %s)", timings["total_s"], cache_state)
    return {
        "passed": gate["passed"],
        "decision": gate["decision"],
        "primary_metric": g.primary_metric,
        **key,
        "champion_version": gate["champion_version"],
        "reasons": gate["reasons"],
        "wall_s": timings["total_s"],
        "cache": cache_state,
        "paths": {
            name: str(eval_dir / name)
            for name in ("metrics.json", "gate.json", "eval_report.md", "comparison.png", "predictions.jsonl")
        },
    }


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def _load_eval_rows(path: Path, max_rows: int) -> list[dict[str, str]]:
    """The eval rows, in a fixed order (by id: a content hash, so a stable pseudo-random subset)."""
    rows = sorted(read_split(path, "eval split"), key=lambda r: (r["id"], r["question"]))
    return rows[:max_rows]


def _fetch_champion(cfg: Config, dest: Path) -> dict[str, Any] | None:
    """The registry's champion (merged model fetched under `dest`), or None if there is none yet.

    Goes through `tasks.stages.register.fetch_champion`; until that module exists, there is no champion.
    """
    try:
        register = importlib.import_module("tasks.stages.register")
    except ModuleNotFoundError as exc:
        if exc.name != "tasks.stages.register":
            raise
        log.info("no registry module yet: evaluating without a champion")
        return None
    fetch = getattr(register, "fetch_champion", None)
    if fetch is None:
        log.info("tasks.stages.register has no fetch_champion yet: evaluating without a champion")
        return None
    champion = fetch(cfg, dest)
    if champion is None:
        log.info(
            "no champion registered for %r: the base comparison and floors decide", cfg.register.model_name
        )
    else:
        log.info(
            "champion: %s version %s (run %s)",
            cfg.register.model_name,
            champion["version"],
            champion.get("run_id"),
        )
    return champion


# ----------------------------------------------------------------------------------------------------
# Scoring one model (cached)
# ----------------------------------------------------------------------------------------------------


class _Scorer:
    """Scores models on the eval rows; owns the device, dtype and result cache."""

    def __init__(self, cfg: Config, rows: list[dict[str, str]], cache_root: Path | None) -> None:
        self.cfg = cfg
        self.rows = rows
        self.cache_root = cache_root
        self.data_hash = hashlib.sha256(
            json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()
        ).hexdigest()[:16]
        self._device: str | None = None
        self._dtype_name: str | None = None
        self._fingerprints: dict[str, str] = {}

    def _setup_device(self) -> tuple[str, str]:
        if self._device is None:
            from tasks.plumbing.device import detect_capabilities, plan_device

            caps = detect_capabilities(self.cfg.runtime.device)
            plan = plan_device(caps, precision=self.cfg.train.precision)
            self._device = plan.device
            # Evaluate in the precision the model trains in where the hardware has it (bf16 on MI300X),
            # fp32 on CPU; fp16 only when asked.
            self._dtype_name = {"bf16": "bfloat16", "fp16": "float16"}.get(plan.precision, "float32")
        return self._device, self._dtype_name  # type: ignore[return-value]

    def _fingerprint(self, path: str) -> str:
        if path not in self._fingerprints:
            self._fingerprints[path] = _fingerprint(path, self.cfg, self.cache_root)
        return self._fingerprints[path]

    def run(
        self,
        role: str,
        model_src: str,
        adapter: Path | None,
        timings: dict[str, float],
        cache_state: dict[str, str],
    ) -> list[dict[str, Any]]:
        device, dtype = self._setup_device()
        e = self.cfg.eval
        material = {
            "cache_version": CACHE_VERSION,
            "model": self._fingerprint(model_src),
            "adapter": self._fingerprint(str(adapter)) if adapter else None,
            "data": self.data_hash,
            "template": format_prompt("{q}") + format_completion("{a}"),
            "max_new_tokens": e.max_new_tokens,
            "batch_size": e.batch_size,  # padding changes floating-point sums, rarely tokens: key on it
            "device": device,
            "dtype": dtype,
        }
        key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]
        cached = self._cache_get(key)
        if cached is not None:
            cache_state[role] = "hit"
            log.info("%s: cached results %s reused", role, key)
            return cached
        cache_state[role] = "miss" if self.cache_root else "off"

        t0 = time.perf_counter()
        model, tokenizer = _load_model(
            self.cfg, model_src, adapter, device, dtype, is_base=role != "champion"
        )
        t1 = time.perf_counter()
        losses = _answer_losses(model, tokenizer, self.rows, e.batch_size, device)
        t2 = time.perf_counter()
        generations = _generate(model, tokenizer, self.rows, e.batch_size, e.max_new_tokens, device)
        t3 = time.perf_counter()
        del model
        gc.collect()
        out = []
        for row, (nll, n_tok), gen in zip(self.rows, losses, generations, strict=True):
            pred = gen["prediction"]
            out.append(
                {
                    "id": row["id"],
                    "category": row["category"],
                    "prediction": pred,
                    **score_row(pred, row["answer"]),
                    "ended_with_eos": gen["ended_with_eos"],
                    "empty": not pred.strip(),
                    "gen_tokens": gen["gen_tokens"],
                    "pred_words": len(pred.split()),
                    "ref_words": len(row["answer"].split()),
                    "nll_sum": nll,
                    "n_answer_tokens": n_tok,
                }
            )
        timings[f"{role}_load_s"] = round(t1 - t0, 2)
        timings[f"{role}_loss_s"] = round(t2 - t1, 2)
        timings[f"{role}_generate_s"] = round(t3 - t2, 2)
        log.info(
            "%s: scored %d rows (load %.1fs, loss %.1fs, generate %.1fs)",
            role,
            len(out),
            t1 - t0,
            t2 - t1,
            t3 - t2,
        )
        self._cache_put(key, material, out)
        return out

    def _cache_get(self, key: str) -> list[dict[str, Any]] | None:
        if self.cache_root is None:
            return None
        path = self.cache_root / f"{key}.json"
        if not path.is_file():
            return None
        try:
            rows = read_json(path)["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("eval cache entry %s is unreadable; recomputing", path)
            return None
        if [r.get("id") for r in rows] != [r["id"] for r in self.rows]:
            return None
        return rows

    def _cache_put(self, key: str, material: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        if self.cache_root is not None:
            write_json_atomic(self.cache_root / f"{key}.json", {"key": material, "rows": rows})


def _fingerprint(src: str, cfg: Config, cache_root: Path | None) -> str:
    """A content fingerprint of a model or adapter directory (weights, config, tokenizer files).

    File digests are memoized per (path, size, mtime) beside the cache, so multi-GB base weights are
    hashed once, not on every run. A hub id (no local directory) is identified by id and revision.
    """
    path = Path(src)
    if not path.is_dir():
        return f"hub:{src}@{cfg.base.revision or 'main'}"
    memo_path = cache_root / "fingerprints.json" if cache_root else None
    memo: dict[str, str] = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = read_json(memo_path)
        except (OSError, ValueError):
            memo = {}
    digest = hashlib.sha256()
    changed = False
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)):
        st = f.stat()
        memo_key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        file_hash = memo.get(memo_key)
        if file_hash is None:
            with f.open("rb") as fh:
                file_hash = hashlib.file_digest(fh, "sha256").hexdigest()
            memo[memo_key] = file_hash
            changed = True
        digest.update(f"{f.name}:{file_hash}\n".encode())
    if memo_path is not None and changed:
        write_json_atomic(memo_path, memo)
    return digest.hexdigest()[:24]


def _load_model(
    cfg: Config, src: str, adapter: Path | None, device: str, dtype: str, *, is_base: bool
) -> tuple[Any, Any]:
    """A model in eval mode on `device` and its tokenizer; an adapter is merged in (faster, same math)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    hub = {"revision": cfg.base.revision, "trust_remote_code": cfg.base.trust_remote_code} if is_base else {}
    model = AutoModelForCausalLM.from_pretrained(
        src,
        dtype=getattr(torch, dtype),
        use_safetensors=None if cfg.base.allow_pickle_weights else True,
        **hub,
    )
    tok_src: str | Path = src
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        if (adapter / "tokenizer_config.json").is_file():
            tok_src = adapter  # the tokenizer trained with the adapter (it may have added tokens)
    tokenizer = AutoTokenizer.from_pretrained(tok_src, **hub)
    if tokenizer.pad_token_id is None:
        # Hub Llamas ship without a pad token; the attention mask makes any id safe for padding.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


def _answer_losses(
    model: Any, tokenizer: Any, rows: Sequence[Mapping[str, str]], batch_size: int, device: str
) -> list[tuple[float, int]]:
    """(sum of NLL, number of tokens) over each row's answer tokens, teacher-forced.

    The mask is built as TRL's SFTTrainer builds it for prompt/completion data: the completion starts
    where the tokenized prompt and the tokenized prompt+completion diverge, so the loss here is the
    training loss on held-out rows (the answer text and its EOS, never the prompt).
    """
    import torch
    import torch.nn.functional as F

    seqs: list[tuple[list[int], int]] = []
    for row in rows:
        prompt = format_prompt(row["question"])
        p_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + format_completion(row["answer"]))["input_ids"]
        common = 0
        for a, b in zip(p_ids, full, strict=False):
            if a != b:
                break
            common += 1
        seqs.append((full, common))

    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(seqs[i][0]))
    pad = tokenizer.pad_token_id
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


def _generate(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    batch_size: int,
    max_new_tokens: int,
    device: str,
) -> list[dict[str, Any]]:
    """Greedy answers, batched with left padding (prompts sorted by length), KV cache on."""
    import torch
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad, use_cache=True
    )
    prompts = [tokenizer(format_prompt(r["question"]))["input_ids"] for r in rows]
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
            new = seqs[:, width:].cpu().tolist()
            for j, i in enumerate(idx):
                tokens = new[j]
                ended = eos in tokens
                tokens = tokens[: tokens.index(eos)] if ended else tokens
                text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                out[i] = {"prediction": text, "ended_with_eos": ended, "gen_tokens": len(tokens)}
    return out


# ----------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """JSON-safe number: NaN/inf become None (they are not valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else round(obj, 6)
    return obj


def _model_cis(cfg: Config, results: Mapping[str, list[dict[str, Any]] | None]) -> dict[str, Any]:
    """Per model, the bootstrap CI of each primary metric's mean (the chart's error bars)."""
    e = cfg.eval
    metrics = list(dict.fromkeys([*e.primary_metrics, cfg.gate.primary_metric]))
    return {
        model: {
            m: bootstrap_ci(metric_array(rows, m), e.bootstrap_samples, e.confidence, e.seed) for m in metrics
        }
        for model, rows in results.items()
        if rows is not None
    }


def _write_outputs(
    cfg: Config,
    run_dir: Path,
    rows: list[dict[str, str]],
    results: Mapping[str, list[dict[str, Any]] | None],
    summary: Mapping[str, dict[str, float] | None],
    gate: dict[str, Any],
    model_cis: dict[str, Any],
    champion: Mapping[str, Any] | None,
    timings: Mapping[str, float],
) -> Path:
    final = run_dir / "eval"
    comps = gate["comparisons"]
    metrics_json: dict[str, Any] = {
        m: {k: v for k, v in summary[m].items() if math.isfinite(v)} for m in MODELS if summary[m] is not None
    }
    for label, comp in (
        ("candidate_minus_base", comps["vs_base"]),
        ("candidate_minus_champion", comps["vs_champion"]),
    ):
        if comp is not None:
            metrics_json[label] = {
                m: {"mean": ci["mean"], "ci_low": ci["low"], "ci_high": ci["high"]}
                for m, ci in comp["overall"].items()
            }
    metrics_json["gate"] = {"passed": int(gate["passed"]), "failed_rules": len(gate["reasons"])}

    gate_json = {
        "passed": gate["passed"],
        "decision": gate["decision"],
        "primary_metric": gate["primary_metric"],
        "rules": gate["rules"],
        "reasons": gate["reasons"],
        "champion_version": gate["champion_version"],
        "metrics": {m: summary[m] for m in MODELS},
        "ci": {
            "confidence": cfg.eval.confidence,
            "bootstrap_samples": cfg.eval.bootstrap_samples,
            "seed": cfg.eval.seed,
            "vs_base": comps["vs_base"]["overall"],
            "vs_champion": comps["vs_champion"]["overall"] if comps["vs_champion"] else None,
        },
        "champion": dict(champion) if champion else None,
        "eval_rows": len(rows),
    }
    slices = _slice_table(cfg, results, comps)

    with atomic_dir(final) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(_clean(metrics_json), indent=2) + "\n", encoding="utf-8")
        (tmp / "gate.json").write_text(json.dumps(_clean(gate_json), indent=2) + "\n", encoding="utf-8")
        (tmp / "slices.json").write_text(json.dumps(_clean(slices), indent=2) + "\n", encoding="utf-8")
        with (tmp / "predictions.jsonl").open("w", encoding="utf-8") as fh:
            for i, row in enumerate(rows):
                rec: dict[str, Any] = dict(row)
                for m in MODELS:
                    res = results[m]
                    if res is not None:
                        r = res[i]
                        rec[m] = {
                            k: _finite(r[k])
                            for k in ("prediction", *ROW_METRICS, "ended_with_eos", "empty", "gen_tokens")
                        }
                        rec[m]["loss"] = r["nll_sum"] / max(r["n_answer_tokens"], 1)
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        plots = tmp / "plots"
        plots.mkdir()
        _write_csv(plots / "models.csv", _models_table(summary, model_cis))
        _write_csv(plots / "slices.csv", _slices_long(slices))
        _plot(cfg, summary, model_cis, tmp / "comparison.png")
        (tmp / "eval_report.md").write_text(
            _report(cfg, rows, results, summary, gate, slices, champion, timings), encoding="utf-8"
        )
    log.info("wrote %s", final)
    return final


def _slice_table(
    cfg: Config, results: Mapping[str, list[dict[str, Any]] | None], comps: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """One entry per category: size, each model's primary metrics, the candidate's deltas and CIs."""
    from tasks.stages.evaluate.metrics import slice_indices

    metrics = list(dict.fromkeys([*cfg.eval.primary_metrics, cfg.gate.primary_metric]))
    cand = results["candidate"]
    assert cand is not None
    table = []
    for name, idx in slice_indices(cand).items():
        entry: dict[str, Any] = {
            "category": name,
            "n": int(idx.size),
            "gated": int(idx.size) >= cfg.gate.min_slice_size,
        }
        for model in MODELS:
            res = results[model]
            if res is not None:
                entry[model] = {m: float(metric_array(res, m)[idx].mean()) for m in metrics}
        entry["vs_base"] = comps["vs_base"]["slices"][name]
        entry["vs_champion"] = comps["vs_champion"]["slices"][name] if comps["vs_champion"] else None
        table.append(entry)
    return table


def _models_table(
    summary: Mapping[str, dict[str, float] | None], cis: Mapping[str, Any]
) -> list[dict[str, Any]]:
    cols = TABLE_COLUMNS
    out = []
    for model in MODELS:
        s = summary[model]
        if s is None:
            continue
        rec: dict[str, Any] = {"model": model, **{c: round(s[c], 6) for c in cols if c in s}}
        for m, ci in cis[model].items():
            rec[f"{m}_ci_low"], rec[f"{m}_ci_high"] = round(ci["low"], 6), round(ci["high"], 6)
        out.append(rec)
    return out


def _slices_long(slices: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for s in slices:
        for model in MODELS:
            if s.get(model):
                out.append(
                    {
                        "category": s["category"],
                        "n": s["n"],
                        "model": model,
                        **{k: round(v, 6) for k, v in s[model].items()},
                    }
                )
    return out


def _write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _plot(cfg: Config, summary: Mapping[str, Any], cis: Mapping[str, Any], path: Path) -> None:
    """Grouped bars: per primary metric, the models side by side, with bootstrap CI error bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers; must precede pyplot
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = list(dict.fromkeys([*cfg.eval.primary_metrics, cfg.gate.primary_metric]))
    models = [m for m in MODELS if summary[m] is not None]
    colors = {"base": "#9e9e9e", "candidate": "#1f77b4", "champion": "#ff7f0e"}
    x = np.arange(len(metrics))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(metrics), 4))
    for k, model in enumerate(models):
        means = [cis[model][m]["mean"] for m in metrics]
        err = [
            [cis[model][m]["mean"] - cis[model][m]["low"] for m in metrics],
            [cis[model][m]["high"] - cis[model][m]["mean"] for m in metrics],
        ]
        bars = ax.bar(
            x + (k - (len(models) - 1) / 2) * width,
            means,
            width,
            yerr=err,
            capsize=3,
            label=model,
            color=colors[model],
        )
        ax.bar_label(bars, fmt="%.3f", fontsize=7, label_type="center", color="white")
    ax.set_xticks(x, metrics)
    ax.set_ylabel("mean over eval rows")
    ax.set_ylim(0, min(1.05, max(0.1, 1.25 * max(cis[m][k]["high"] for m in models for k in metrics))))
    ax.set_title(f"base vs candidate vs champion ({cfg.eval.confidence:.0%} bootstrap CIs)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _md_escape(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _report(
    cfg: Config,
    rows: list[dict[str, str]],
    results: Mapping[str, list[dict[str, Any]] | None],
    summary: Mapping[str, dict[str, float] | None],
    gate: dict[str, Any],
    slices: Sequence[Mapping[str, Any]],
    champion: Mapping[str, Any] | None,
    timings: Mapping[str, float],
) -> str:
    e, g = cfg.eval, cfg.gate
    metrics = list(dict.fromkeys([*e.primary_metrics, g.primary_metric]))
    models = [m for m in MODELS if summary[m] is not None]
    pct = f"{e.confidence:.0%}"
    lines = [
        "# Evaluation report",
        "",
        f"**Gate: {'PASSED' if gate['passed'] else 'FAILED'}** (primary metric `{g.primary_metric}`; "
        f"{len(rows)} eval rows; champion: "
        f"{'version ' + str(champion['version']) if champion else 'none registered yet'})",
        "",
    ]
    if gate["reasons"]:
        lines += ["Reasons:", ""] + [f"- {r}" for r in gate["reasons"]] + [""]

    cols = TABLE_COLUMNS
    lines += ["## Models", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in models:
        s = summary[m]
        assert s is not None
        lines.append(f"| {m} | " + " | ".join(_fmt(s.get(c)) for c in cols) + " |")
    ref_words = summary["candidate"].get("reference_words_mean") if summary["candidate"] else None
    lines += ["", f"Reference answers average {_fmt(ref_words, 1)} words.", ""]

    comps = gate["comparisons"]
    lines += [
        f"## Paired bootstrap ({pct} CI, {e.bootstrap_samples} resamples, seed {e.seed})",
        "",
        "| comparison | metric | mean difference | CI low | CI high |",
        "|---|---|---|---|---|",
    ]
    for label, comp in (
        ("candidate − base", comps["vs_base"]),
        ("candidate − champion", comps["vs_champion"]),
    ):
        if comp is None:
            continue
        for m in metrics:
            ci = comp["overall"][m]
            lines.append(f"| {label} | {m} | {ci['mean']:+.4f} | {ci['low']:+.4f} | {ci['high']:+.4f} |")
    lines += [
        "",
        "## Gate rules",
        "",
        "| rule | passed | value | threshold | detail |",
        "|---|---|---|---|---|",
    ]
    for r in gate["rules"]:
        lines.append(
            f"| `{r['name']}` | {'yes' if r['passed'] else '**NO**'} | {_fmt(r['value'])} | "
            f"{_fmt(r['threshold'])} | {_md_escape(r['detail'], 400)} |"
        )

    pm = g.primary_metric
    lines += [
        "",
        f"## Slices by category (`{pm}`; slices with >= {g.min_slice_size} rows gate)",
        "",
        "| category | rows | gated | " + " | ".join(models) + " | cand − base | cand − champion |",
        "|---" * (len(models) + 5) + "|",
    ]
    for s in slices:
        vc = s["vs_champion"][pm]["mean"] if s["vs_champion"] else None
        lines.append(
            f"| {s['category']} | {s['n']} | {'yes' if s['gated'] else 'no'} | "
            + " | ".join(_fmt(s[m][pm], 3) for m in models)
            + f" | {s['vs_base'][pm]['mean']:+.3f} | {_fmt(vc, 3) if vc is None else f'{vc:+.3f}'} |"
        )

    lines += ["", "## Regressions: the champion answered right, the candidate now does not", ""]
    cand = results["candidate"]
    champ = results["champion"]
    assert cand is not None
    if champ is None:
        lines.append("No champion yet.")
    else:
        lost = [
            i for i in range(len(rows)) if champ[i]["exact_match"] == 1.0 and cand[i]["exact_match"] < 1.0
        ]
        drops = sorted(
            (i for i in range(len(rows)) if champ[i][pm] - cand[i][pm] >= 0.5 and i not in lost),
            key=lambda i: cand[i][pm] - champ[i][pm],
        )
        lines.append(
            f"{len(lost)} rows the champion matched exactly are no longer exact; "
            f"{len(drops)} more lost >= 0.5 `{pm}`."
        )
        picked = (lost + drops)[:10]
        if picked:
            lines += [
                "",
                "| id | category | question | reference | champion | candidate |",
                "|---|---|---|---|---|---|",
            ]
            for i in picked:
                r = rows[i]
                lines.append(
                    f"| {r['id']} | {r['category']} | {_md_escape(r['question'], 80)} | {_md_escape(r['answer'], 80)} | "
                    f"{_md_escape(champ[i]['prediction'], 80)} | {_md_escape(cand[i]['prediction'], 80)} |"
                )

    lines += ["", "## Sample generations", ""]
    for i in range(min(5, len(rows))):
        r = rows[i]
        lines += [
            f"**{_md_escape(r['question'], 200)}** (`{r['category']}`)",
            "",
            f"- reference: {_md_escape(r['answer'], 300)}",
        ]
        for m in models:
            res = results[m]
            assert res is not None
            p = res[i]
            lines.append(
                f"- {m}: {_md_escape(p['prediction'], 300) or '(empty)'} (F1 {p['token_f1']:.2f}{'' if p['ended_with_eos'] else ', no EOS'})"
            )
        lines.append("")

    lines += ["## Timing", "", "| step | seconds |", "|---|---|"] + [
        f"| {k} | {v} |" for k, v in timings.items()
    ]
    lines += [
        "",
        "Files: metrics.json, gate.json, slices.json, predictions.jsonl, comparison.png, plots/.",
        "",
    ]
    return "\n".join(lines)
