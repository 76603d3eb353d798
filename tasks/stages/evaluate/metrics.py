"""Answer metrics, the paired bootstrap and the regression gate, as pure functions (no model, no I/O).

`tasks.stages.evaluate` produces per-row scores for each model; everything that turns those scores into
numbers and a decision lives here, so it can be tested on hand-made rows in milliseconds.

Conventions:
- Per-row scores are floats in [0, 1], higher is better: `exact_match`, `token_f1`, `rouge_l`.
- A "rows" list is one dict per eval row with at least `category` and those scores, in the same row
  order for every model (pairing is by position).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

# Metrics that can be primary (gated and bootstrapped): per-row, higher is better.
ROW_METRICS: tuple[str, ...] = ("exact_match", "token_f1", "rouge_l")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


# ----------------------------------------------------------------------------------------------------
# Per-row metrics
# ----------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch if ch not in _PUNCT else " " for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized prediction equals the normalized reference, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-level F1 between normalized bags of words.

    When either side has no tokens, F1 is 1.0 if both are empty and 0.0 otherwise (as in SQuAD).
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred)
    recall = overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    # rouge-score pulls in nltk (about 2 s to import): load it on first use only.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence), from the `rouge-score` package, with stemming."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def score_row(prediction: str, reference: str) -> dict[str, float]:
    """All per-row answer metrics for one prediction."""
    return {
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
    }


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------


def answer_diversity(predictions: Sequence[str]) -> dict[str, Any]:
    """How question-specific a model's answers are, on SQuAD-normalized text.

    Returns `distinct_answer_share` (distinct answers / answers), `top_answer_share` (share of the most
    common answer) and `top_answer` (its text). A model that answers every question with one sentence has
    a high top share whatever its F1.
    """
    counts = Counter(normalize_answer(p) for p in predictions)
    if not counts:
        return {"distinct_answer_share": float("nan"), "top_answer_share": float("nan"), "top_answer": ""}
    top, top_n = counts.most_common(1)[0]
    n = len(predictions)
    return {"distinct_answer_share": len(counts) / n, "top_answer_share": top_n / n, "top_answer": top}


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Model-level metrics from per-row results.

    Rows may carry `nll_sum` and `n_answer_tokens` (teacher-forced loss on the answer tokens),
    `pred_words`, `ref_words`, `gen_tokens`, `ended_with_eos`, `empty` and `prediction` (the answer
    text, for `distinct_answer_share` / `top_answer_share`); the matching metrics are
    produced when present. The loss is token-weighted (the mean NLL per answer token over all rows),
    as in training; perplexity is its exponential.
    """
    out: dict[str, float] = {"n_rows": float(len(rows))}
    for name in ROW_METRICS:
        if rows and name in rows[0]:
            out[name] = _mean([float(r[name]) for r in rows])
    if rows and "nll_sum" in rows[0]:
        tokens = sum(int(r["n_answer_tokens"]) for r in rows)
        loss = sum(float(r["nll_sum"]) for r in rows) / max(tokens, 1)
        out["loss"] = loss
        out["perplexity"] = math.exp(min(loss, 700.0))  # exp overflows a float beyond ~709
    if rows and "pred_words" in rows[0]:
        words = np.array([r["pred_words"] for r in rows], dtype=float)
        out["answer_words_mean"] = float(words.mean())
        out["answer_words_median"] = float(np.median(words))
        out["answer_words_p90"] = float(np.percentile(words, 90))
    if rows and "ref_words" in rows[0]:
        ref = np.array([r["ref_words"] for r in rows], dtype=float)
        out["reference_words_mean"] = float(ref.mean())
        if "pred_words" in rows[0]:
            out["length_ratio"] = float(words.sum() / max(ref.sum(), 1.0))
    if rows and "gen_tokens" in rows[0]:
        out["generated_tokens_mean"] = _mean([float(r["gen_tokens"]) for r in rows])
    if rows and "ended_with_eos" in rows[0]:
        out["eos_rate"] = _mean([float(bool(r["ended_with_eos"])) for r in rows])
    if rows and "empty" in rows[0]:
        out["empty_rate"] = _mean([float(bool(r["empty"])) for r in rows])
    if rows and "prediction" in rows[0]:
        diversity = answer_diversity([str(r["prediction"]) for r in rows])
        out["distinct_answer_share"] = diversity["distinct_answer_share"]
        out["top_answer_share"] = diversity["top_answer_share"]
    return out


def slice_indices(rows: Sequence[Mapping[str, Any]], key: str = "category") -> dict[str, np.ndarray]:
    """Row positions of each slice (by `key`), slices sorted by size (largest first), then name."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(str(row.get(key, "")), []).append(i)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return {name: np.asarray(idx, dtype=np.int64) for name, idx in ordered}


def metric_array(rows: Sequence[Mapping[str, Any]], metric: str) -> np.ndarray:
    """One per-row metric as a float array, in row order."""
    return np.asarray([float(r[metric]) for r in rows], dtype=float)


# ----------------------------------------------------------------------------------------------------
# Paired bootstrap
# ----------------------------------------------------------------------------------------------------


def bootstrap_ci(
    values: np.ndarray,
    samples: int,
    confidence: float,
    seed: int,
    reference: np.ndarray | None = None,
) -> dict[str, float]:
    """Percentile bootstrap CI of a mean, or of a paired mean difference.

    With `reference`, the statistic is mean(values - reference) with both arrays resampled by the
    same row indices (a paired bootstrap: the two models answered the same questions, so the
    per-question difficulty cancels and the interval is much tighter than two independent ones).
    The generator is seeded per call, so the same inputs always give the same interval.

    Args:
        values: per-row scores (e.g. the candidate's token F1).
        samples: number of bootstrap resamples.
        confidence: e.g. 0.95 for a 95% interval.
        seed: the RNG seed (`eval.seed`).
        reference: per-row scores of the model compared against (same length and order), if any.

    Returns:
        {"mean", "low", "high", "n"}: the observed statistic and the interval bounds.
    """
    x = np.asarray(values, dtype=float)
    if reference is not None:
        ref = np.asarray(reference, dtype=float)
        if ref.shape != x.shape:
            raise ValueError(f"paired bootstrap needs equal lengths, got {x.shape} and {ref.shape}")
        x = x - ref
    n = int(x.shape[0])
    if n == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    # One (samples, n) index matrix: vectorized, ~1-2 ms for 1000 x 200.
    idx = rng.integers(0, n, size=(samples, n))
    means = x[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "n": n}


# ----------------------------------------------------------------------------------------------------
# The gate
# ----------------------------------------------------------------------------------------------------


def _rule(name: str, passed: bool, value: float | None, threshold: float | None, detail: str) -> dict:
    def clean(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else round(float(v), 6)

    return {
        "name": name,
        "passed": bool(passed),
        "value": clean(value),
        "threshold": clean(threshold),
        "detail": detail,
    }


def compare_models(
    candidate: Sequence[Mapping[str, Any]],
    other: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    samples: int,
    confidence: float,
    seed: int,
    min_slice_size: int = 1,
) -> dict[str, Any]:
    """Paired bootstrap CIs of candidate-minus-other, overall and per slice, for each metric.

    Returns:
        {"overall": {metric: ci}, "slices": {category: {"n": int, metric: ci}}}; slices smaller than
        `min_slice_size` get point differences only (`low`/`high` are NaN), since they do not gate.
    """
    if len(candidate) != len(other):
        raise ValueError(f"models scored different rows: {len(candidate)} vs {len(other)}")
    overall = {
        m: bootstrap_ci(metric_array(candidate, m), samples, confidence, seed, metric_array(other, m))
        for m in metrics
    }
    slices: dict[str, Any] = {}
    for name, idx in slice_indices(candidate).items():
        entry: dict[str, Any] = {"n": int(idx.size)}
        for m in metrics:
            c, o = metric_array(candidate, m)[idx], metric_array(other, m)[idx]
            if idx.size >= min_slice_size:
                entry[m] = bootstrap_ci(c, samples, confidence, seed, o)
            else:
                d = float((c - o).mean())
                entry[m] = {"mean": d, "low": float("nan"), "high": float("nan"), "n": int(idx.size)}
        slices[name] = entry
    return {"overall": overall, "slices": slices}


def decide_gate(
    candidate: Sequence[Mapping[str, Any]],
    base: Sequence[Mapping[str, Any]],
    champion: Sequence[Mapping[str, Any]] | None,
    *,
    primary_metric: str,
    primary_metrics: Sequence[str],
    min_improvement: float,
    max_regression: float,
    min_slice_size: int,
    min_eos_rate: float,
    max_empty_rate: float,
    max_top_answer_share: float = 1.0,
    regression_test: str = "mean",
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    champion_version: str | None = None,
    extra_rules: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Apply the regression gate to per-row results of the three models, plus `extra_rules` (the
    forgetting rule, decided on general text: general.py).

    Rules (each recorded with its value and threshold):
      1. `beats_base:<primary_metric>`: the lower CI bound of candidate-minus-base > `min_improvement`.
      2. `no_regression:<metric>` for each primary metric, and `no_regression:<metric>[<slice>]` for
         each slice with at least `min_slice_size` rows: against the champion, the drop must not exceed
         `max_regression`: the observed mean difference (`regression_test="mean"`), or the CI's lower
         bound (`"noninferiority"`: a formal non-inferiority test, stricter, needs many rows per slice).
         Without a champion, one informational rule records that only the base and floors decide.
      3. `min_eos_rate` / `max_empty_rate` / `max_top_answer_share`: floors on the candidate's answers
         (it stops, it answers, and not one answer to many questions: that can still beat a weak base).

    Returns:
        {passed, decision, primary_metric, rules, reasons, champion_version, comparisons: {vs_base, vs_champion}}
    """
    metrics = list(dict.fromkeys([*primary_metrics, primary_metric]))
    pct = f"{confidence:.0%}"
    vs_base = compare_models(candidate, base, metrics, samples, confidence, seed, min_slice_size)
    rules = [_beats_base_rule(vs_base["overall"][primary_metric], primary_metric, min_improvement, pct)]
    vs_champion = (
        compare_models(candidate, champion, metrics, samples, confidence, seed, min_slice_size)
        if champion is not None
        else None
    )
    rules += _regression_rules(
        vs_champion, primary_metrics, min_slice_size, max_regression, regression_test, pct
    )
    rules += [*_floor_rules(candidate, min_eos_rate, max_empty_rate, max_top_answer_share), *extra_rules]

    reasons = [f"{r['name']}: {r['detail']}" for r in rules if not r["passed"]]
    return {
        "passed": not reasons,
        "decision": "fail" if reasons else "pass",
        "primary_metric": primary_metric,
        "rules": rules,
        "reasons": reasons,
        "champion_version": champion_version,
        "comparisons": {"vs_base": vs_base, "vs_champion": vs_champion},
    }


def _beats_base_rule(ci: Mapping[str, float], metric: str, min_improvement: float, pct: str) -> dict:
    return _rule(
        f"beats_base:{metric}",
        ci["low"] > min_improvement,
        ci["low"],
        min_improvement,
        f"candidate - base {metric} = {ci['mean']:+.4f}, {pct} CI "
        f"[{ci['low']:+.4f}, {ci['high']:+.4f}]; the lower bound must exceed {min_improvement:+.4f}",
    )


def _regression_rules(
    vs_champion: Mapping[str, Any] | None,
    primary_metrics: Sequence[str],
    min_slice_size: int,
    max_regression: float,
    regression_test: str,
    pct: str,
) -> list[dict]:
    """`no_regression:<metric>` overall and `no_regression:<metric>[<slice>]` per gated slice; without a
    champion, one informational rule that passes."""
    if vs_champion is None:
        detail = "no champion registered yet: the base comparison and the sanity floors decide"
        return [_rule("no_regression:champion", True, None, None, detail)]
    checks: list[tuple[str, Mapping[str, float]]] = [
        (f"no_regression:{m}", vs_champion["overall"][m]) for m in primary_metrics
    ]
    for name, entry in vs_champion["slices"].items():
        if entry["n"] >= min_slice_size:
            checks += [(f"no_regression:{m}[{name}]", entry[m]) for m in primary_metrics]
    rules = []
    for rule_name, c in checks:
        if regression_test == "noninferiority":
            value, how = c["low"], f"the {pct} CI lower bound"
        else:
            value, how = c["mean"], "the mean difference"
        rules.append(
            _rule(
                rule_name,
                value >= -max_regression,
                value,
                -max_regression,
                f"candidate - champion = {c['mean']:+.4f} over {c['n']} rows, {pct} CI "
                f"[{c['low']:+.4f}, {c['high']:+.4f}]; {how} must be >= {-max_regression:+.4f}",
            )
        )
    return rules


def _floor_rules(
    candidate: Sequence[Mapping[str, Any]], min_eos_rate: float, max_empty_rate: float, max_top_share: float
) -> list[dict]:
    """Sanity floors on the candidate's generations (a model that never stops, or gives one answer to
    many questions, can score well on F1)."""
    cand = aggregate(candidate)
    eos, empty = cand.get("eos_rate", float("nan")), cand.get("empty_rate", float("nan"))
    rules = [
        _rule(
            "min_eos_rate",
            eos >= min_eos_rate,
            eos,
            min_eos_rate,
            f"{eos:.1%} of the candidate's answers ended with EOS; at least {min_eos_rate:.1%} must",
        ),
        _rule(
            "max_empty_rate",
            empty <= max_empty_rate,
            empty,
            max_empty_rate,
            f"{empty:.1%} of the candidate's answers are empty; at most {max_empty_rate:.1%} may be",
        ),
    ]
    if candidate and "prediction" in candidate[0]:
        div = answer_diversity([str(r["prediction"]) for r in candidate])
        share = div["top_answer_share"]
        rules.append(
            _rule(
                "max_top_answer_share",
                share <= max_top_share,
                share,
                max_top_share,
                f"{share:.1%} of the candidate's answers are the same ({div['top_answer'][:80]!r}; "
                f"{div['distinct_answer_share']:.1%} distinct); at most {max_top_share:.1%} may be",
            )
        )
    return rules
