"""`qa-lora evaluate`: score the base, the candidate and the champion on the held-out rows; the gate.

Readable top to bottom:
  eval rows -> the champion from the model registry (tasks.plumbing.registry) -> per model (reused when
  its fingerprint matches): answer-token loss + greedy answers -> per-row scores (scoring.py)
  -> paired bootstrap CIs (candidate - base, candidate - champion), overall and per category
  -> gate rules (metrics.py) -> run_dir/eval/{metrics.json, gate.json, eval_report.md, comparison.png,
     predictions.jsonl, slices.json, plots/} written as one atomic directory (outputs.py, report.py).

The gate's result is data: a failing gate is written to gate.json and logged as a WARNING with its
reasons; this stage does not raise for it (the DAG decides what a failed gate stops). A registry that
cannot be read is an error, never "no champion": evaluating without the champion would let a regression
through.

Per-model results are cached under `eval.cache_dir`, keyed by the model's content fingerprint (base
weights, adapter, or the champion's merged weights), a hash of the eval rows, the chat format and
the generation settings, so the base and the champion are not re-scored every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json, write_json_atomic
from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.core.layout import RunLayout
from tasks.core.reuse import fingerprint, reusable
from tasks.plumbing.chat import ChatFormat, chat_format, check_same_format
from tasks.plumbing.general_text import general_documents, texts_digest
from tasks.plumbing.harness import check_tasks, harness_settings
from tasks.plumbing.loading import load_tokenizer, resolve_base
from tasks.plumbing.registry import fetched_champion
from tasks.plumbing.splits import eval_sample
from tasks.stages.evaluate.general import forgetting_rule
from tasks.stages.evaluate.harness import harness_rule
from tasks.stages.evaluate.metrics import aggregate, decide_gate
from tasks.stages.evaluate.outputs import model_cis, write_outputs
from tasks.stages.evaluate.records import MODELS, Evaluation, finite
from tasks.stages.evaluate.scoring import ModelSpec, Scored, plan_eval_device, score_model

log = logging.getLogger("qa_lora.evaluate")

# Bump when a change here changes per-row results (scoring, decoding, tokenizing): older entries are
# ignored. 2: the one tokenizer loader and its pad rule; entries keyed by tasks.core.reuse.fingerprint.
# 3: prompts rendered by the chat template, generation stops at its end-of-turn token.
# 4: entries hold the general-text losses of the forgetting rule beside the rows.
# 5: and the lm-evaluation-harness results (base and candidate).
CACHE_VERSION = "5"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".jinja")


def evaluate_candidate(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Score base, candidate and the registry's champion on the eval split and apply the regression gate.

    Args:
        cfg: the pipeline configuration (sections `eval`, `gate`, `base`, `register`, `runtime`).
        run_dir: the run directory; reads `data/eval.jsonl` and `train/adapter/`, writes `eval/`.

    Returns:
        {"passed", "decision", "primary_metric", "candidate", "base", "champion" (key metrics),
         "champion_version", "reasons", "wall_s", "cache", "paths"}.

    Raises:
        UserError: the eval split or the adapter is missing or malformed, or the champion's downloaded
            tree is incomplete.
        StoreUnavailable: the registry (`register.tracking_uri`) cannot be read.
    """
    started = time.perf_counter()
    layout = RunLayout.of(run_dir)
    rows = _read_inputs(cfg, layout)
    with fetched_champion(cfg) as champion:
        _log_champion(cfg, champion)
        return _evaluate(cfg, layout, rows, champion, started)


def evaluate_against(cfg: Config, run_dir: Path, champion: Mapping[str, Any] | None) -> dict[str, Any]:
    """The same evaluation against a champion the caller names instead of the registry's.

    For callers that have no registry at hand (a benchmark on a GPU machine scores base and candidate
    only with `champion=None`). The pipeline, the CLI and the DAG use :func:`evaluate_candidate`.

    Args:
        cfg: as for :func:`evaluate_candidate`.
        run_dir: as for :func:`evaluate_candidate`.
        champion: None (the base comparison and the sanity floors decide), or a record shaped like
            `tasks.plumbing.registry.fetch_champion`'s: at least "version" and "merged_path" (a model
            directory with its tokenizer).

    Returns:
        As :func:`evaluate_candidate`.
    """
    started = time.perf_counter()
    layout = RunLayout.of(run_dir)
    return _evaluate(cfg, layout, _read_inputs(cfg, layout), champion, started)


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def _read_inputs(cfg: Config, layout: RunLayout) -> list[dict[str, str]]:
    """The eval rows in a fixed order (by id: a content hash, so a stable pseudo-random subset), after
    checking the adapter is there: input errors surface before the registry or a model is touched."""
    rows = eval_sample(layout.eval_split, cfg.eval.max_rows)
    if not (layout.adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{layout.adapter_dir}: no adapter_config.json; run `qa-lora train` first")
    log.info("evaluating on %d eval rows (%d categories)", len(rows), len({r["category"] for r in rows}))
    return rows


def _train_summary(layout: RunLayout) -> dict[str, Any] | None:
    """The run's train summary (its precision verdict decides the scoring precision), or None."""
    try:
        return read_json(layout.train_summary)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning(
            "%s: unreadable (%s); scoring precision from the device plan's rule", layout.train_summary, exc
        )
        return None


def _cache_root(cfg: Config) -> Path | None:
    return cfg.resolve(cfg.eval.cache_dir) if cfg.eval.cache_dir else None


def _log_champion(cfg: Config, champion: Mapping[str, Any] | None) -> None:
    name = cfg.register.model_name
    if champion is None:
        log.info("no champion registered for %r: the base comparison and floors decide", name)
    else:
        log.info("champion: %s version %s (run %s)", name, champion["version"], champion.get("run_id"))


# ----------------------------------------------------------------------------------------------------
# Scoring, the gate, the outputs
# ----------------------------------------------------------------------------------------------------


def _evaluate(
    cfg: Config,
    layout: RunLayout,
    rows: list[dict[str, str]],
    champion: Mapping[str, Any] | None,
    started: float,
) -> dict[str, Any]:
    """Score the models, apply the gate, write eval/; the stage's result."""
    general = general_documents(cfg)  # a hub base without general text fails here, before any scoring
    harness = harness_settings(cfg)  # so does a harness task list without the harness installed
    if harness is not None:
        check_tasks(cfg, rows)  # and an unknown task or an unreachable dataset
    chat = chat_format(cfg, load_tokenizer(cfg))
    check_same_format(
        layout.adapter_dir, chat
    )  # the candidate renders as the base does, or nothing is scored
    specs = _model_specs(cfg, layout, champion)
    timings: dict[str, float] = {}
    cache_state: dict[str, str] = {}
    results: dict[str, list[dict[str, Any]] | None] = dict.fromkeys(MODELS)
    scored: dict[str, Scored] = {}
    device, dtype = plan_eval_device(cfg, _train_summary(layout))
    log.info("scoring on %s in %s", device, dtype)
    for spec in specs:
        vs_base = spec.role != "champion"  # the forgetting and harness rules compare candidate with base
        texts = general[0] if general and vs_base else []
        scored[spec.role], cache_state[spec.role] = _reuse_or_score(
            cfg, spec, rows, (chat, texts, harness if vs_base else None), (device, dtype)
        )
        results[spec.role] = scored[spec.role].results
        timings.update(scored[spec.role].timings)

    extra = [] if general is None else [_forgetting(cfg, scored, general[1])]
    if harness is not None:
        tasks = {role: scored[role].harness for role in ("candidate", "base")}
        extra.append(harness_rule(tasks["candidate"], tasks["base"], cfg.gate.max_harness_regression))
    gate = _apply_gate(cfg, results, champion, extra)
    summary = {m: (aggregate(r) if r is not None else None) for m, r in results.items()}
    timings["total_s"] = round(time.perf_counter() - started, 2)
    ev = Evaluation(rows, results, summary, gate, model_cis(cfg, results), champion, timings)
    eval_dir = write_outputs(cfg, layout, ev)
    _log_gate(gate)
    log.info("eval finished in %.1fs (cache: %s)", timings["total_s"], cache_state)
    return _result(cfg, ev, cache_state, eval_dir)


def _model_specs(cfg: Config, layout: RunLayout, champion: Mapping[str, Any] | None) -> list[ModelSpec]:
    """The models to score: base, candidate (base + this run's adapter) and the champion if any."""
    base = resolve_base(cfg).ref
    adapter = layout.adapter_dir
    specs = [ModelSpec("base", base), ModelSpec("candidate", base, adapter=adapter, tokenizer_dir=adapter)]
    if champion is not None:
        merged = Path(champion["merged_path"])
        if not merged.is_dir():
            raise UserError(
                f"champion version {champion.get('version')}: merged model {merged} is not a directory"
            )
        specs.append(ModelSpec("champion", str(merged), tokenizer_dir=merged, pinned=False))
    return specs


def _reuse_or_score(
    cfg: Config,
    spec: ModelSpec,
    rows: list[dict[str, str]],
    inputs: tuple[ChatFormat, list[str], dict[str, Any] | None],
    on: tuple[str, str],
) -> tuple[Scored, str]:
    """One model's per-row results, general-text losses and harness results: reused from
    `eval.cache_dir` when its fingerprint matches, else scored.

    The fingerprint covers everything that decides them: the model's and the adapter's content, the eval
    rows, the chat format, the general texts and the harness settings (`inputs`), the generation
    settings, the device and dtype (`on`).

    Returns:
        (what was scored, cache state): "hit" (reused), "miss" (scored and stored) or "off".
    """
    cache_root = _cache_root(cfg)
    chat, texts, harness = inputs
    device, dtype = on
    material = {
        "cache_version": CACHE_VERSION,
        "model": _model_fingerprint(spec.src, cfg, cache_root),
        "adapter": _model_fingerprint(str(spec.adapter), cfg, cache_root) if spec.adapter else None,
        "data": hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest(),
        "chat": chat.fingerprint,
        "general": [texts_digest(texts), cfg.eval.general_max_tokens] if texts else None,
        "harness": harness,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "batch_size": cfg.eval.batch_size,  # padding changes floating-point sums, rarely tokens: key on it
        "device": device,
        "dtype": dtype,
    }
    key = fingerprint(material)
    entry = cache_root / f"{key}.json" if cache_root else None
    record = reusable(entry, key) if entry else None
    if record is not None and [r.get("id") for r in record.get("rows", [])] == [r["id"] for r in rows]:
        log.info("%s: cached results %s reused", spec.role, key)
        documents = [tuple(d) for d in record.get("documents") or []]
        return Scored(record["rows"], {}, documents, record.get("harness") or {}), "hit"  # type: ignore[arg-type]
    scored = score_model(cfg, spec, rows, (device, dtype), texts, harness=harness is not None)
    if entry is None:
        return scored, "off"
    write_json_atomic(
        entry,
        {
            "fingerprint": key,
            "material": material,
            "rows": scored.results,
            "documents": [list(d) for d in scored.documents],
            "harness": scored.harness,
        },
    )
    return scored, "miss"


def _model_fingerprint(src: str, cfg: Config, cache_root: Path | None) -> str:
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
        if memo_key not in memo:
            with f.open("rb") as fh:
                memo[memo_key] = hashlib.file_digest(fh, "sha256").hexdigest()
            changed = True
        digest.update(f"{f.name}:{memo[memo_key]}\n".encode())
    if memo_path is not None and changed:
        write_json_atomic(memo_path, memo)
    return digest.hexdigest()[:24]


def _forgetting(cfg: Config, scored: Mapping[str, Scored], source: str) -> dict[str, Any]:
    """The forgetting rule on the base's and the candidate's losses on the general texts (general.py)."""
    e = cfg.eval
    rule = forgetting_rule(
        scored["candidate"].documents,
        scored["base"].documents,
        cfg.gate.max_general_ppl_increase or 0.0,
        e.bootstrap_samples,
        e.confidence,
        e.seed,
    )
    return {**rule, "source": source}


def _apply_gate(
    cfg: Config,
    results: Mapping[str, list[dict[str, Any]] | None],
    champion: Mapping[str, Any] | None,
    extra_rules: list[dict[str, Any]],
) -> dict[str, Any]:
    g = cfg.gate
    return decide_gate(
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
        max_top_answer_share=g.max_top_answer_share,
        regression_test=g.regression_test,
        samples=cfg.eval.bootstrap_samples,
        confidence=cfg.eval.confidence,
        seed=cfg.eval.seed,
        champion_version=str(champion["version"]) if champion else None,
        extra_rules=extra_rules,
    )


def _log_gate(gate: Mapping[str, Any]) -> None:
    if gate["passed"]:
        beats = "; ".join(r["detail"] for r in gate["rules"] if r["name"].startswith("beats"))
        log.info("gate PASSED: %s", beats)
        return
    log.warning("GATE FAILED (%d rule(s)); downstream must not promote this candidate:", len(gate["reasons"]))
    for reason in gate["reasons"]:
        log.warning("  gate: %s", reason)


def _result(cfg: Config, ev: Evaluation, cache_state: dict[str, str], eval_dir: Path) -> dict[str, Any]:
    """The stage's small JSON result (XCom): the decision, key metrics per model, where the files are."""
    g, gate = cfg.gate, ev.gate
    metrics = sorted({*cfg.eval.primary_metrics, g.primary_metric, "eos_rate", "empty_rate", "loss"})
    key = {
        m: ({k: finite(s[k]) for k in metrics} if (s := ev.summary[m]) is not None else None) for m in MODELS
    }
    files = ("metrics.json", "gate.json", "eval_report.md", "comparison.png", "predictions.jsonl")
    return {
        "passed": gate["passed"],
        "decision": gate["decision"],
        "primary_metric": g.primary_metric,
        **key,
        "champion_version": gate["champion_version"],
        "reasons": gate["reasons"],
        "wall_s": ev.timings["total_s"],
        "cache": cache_state,
        "paths": {name: str(eval_dir / name) for name in files},
    }
