"""Near-duplicate questions: word 3-gram Jaccard similarity, found without comparing all pairs.

The rows' shingles are kept as 64-bit keys in one flat array (with offsets): a million questions take
tens of MB, not a set of tuples each.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np


def shingles(text: str) -> set[tuple[str, ...]]:
    """The word 3-grams of `text` (the whole word sequence when it has fewer than three words)."""
    words = re.findall(r"\w+", text)
    if len(words) < 3:
        return {tuple(words)}
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def shingle_keys(text: str) -> list[int]:
    """The distinct shingles of `text` as 64-bit keys (stable within a process; compared, never stored)."""
    return sorted({hash(s) for s in shingles(text)})


def near_duplicates(texts: list[str], threshold: float) -> dict[int, tuple[int, float]]:
    """Index -> (earlier kept index, Jaccard) for texts whose word 3-gram Jaccard >= threshold.

    Args:
        texts: normalized questions, in file order (the earlier of two matches is kept).
        threshold: the Jaccard similarity at or above which two texts are near-duplicates.
    """
    keys = [shingle_keys(t) for t in texts]
    offsets = np.cumsum([0, *(len(k) for k in keys)], dtype=np.int64)
    flat = np.array([key for row in keys for key in row], dtype=np.int64)
    return join_shingles(flat, offsets, threshold)


def join_shingles(flat: np.ndarray, offsets: np.ndarray, threshold: float) -> dict[int, tuple[int, float]]:
    """Row -> (earlier kept row, Jaccard) for rows whose shingle sets reach `threshold`.

    Exact set-similarity join with prefix filtering (Chaudhuri et al. 2006; Bayardo et al. 2007): with
    tokens ordered rarest first, two sets with Jaccard >= t share a token among the first
    |x| - ceil(t*|x|) + 1 tokens of each. Only those prefixes are indexed, and candidates are verified
    exactly, so the cost is about linear in the rows for real text (no all-pairs comparison).

    Args:
        flat: every row's distinct shingle keys, row after row.
        offsets: row i's keys are flat[offsets[i]:offsets[i + 1]].
        threshold: the Jaccard similarity at or above which two rows are near-duplicates.
    """
    if not len(flat):
        return {}
    tokens, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    rank = np.empty(len(tokens), dtype=np.int64)
    rank[np.lexsort((tokens, counts))] = np.arange(len(tokens))  # rarest first, ties by key
    ranked = rank[inverse]
    sizes = np.diff(offsets)

    def row(j: int) -> set[int]:
        return set(ranked[offsets[j] : offsets[j + 1]].tolist())

    index: dict[int, list[int]] = {}
    found: dict[int, tuple[int, float]] = {}
    for i in range(len(sizes)):
        ordered = np.sort(ranked[offsets[i] : offsets[i + 1]]).tolist()
        if not ordered:
            continue
        prefix = ordered[: len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1]
        candidates = sorted({j for tok in prefix for j in index.get(tok, ())})
        best = _first_match(set(ordered), candidates, row, sizes, threshold)
        if best is not None:
            found[i] = best  # a near-duplicate is never indexed: later rows match the row it copies
            continue
        for tok in prefix:
            index.setdefault(tok, []).append(i)
    return found


def _first_match(
    s: set[int], candidates: list[int], row: Any, sizes: np.ndarray, threshold: float
) -> tuple[int, float] | None:
    """The earliest candidate whose exact Jaccard with `s` reaches the threshold."""
    for j in candidates:
        if not threshold * len(s) <= sizes[j] <= len(s) / threshold:
            continue  # the size filter: sets this different in size cannot reach the threshold
        other = row(j)
        score = len(s & other) / len(s | other)
        if score >= threshold:
            return j, score
    return None
