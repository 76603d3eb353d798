"""Near-duplicate questions: word 3-gram Jaccard similarity, found without comparing all pairs."""

from __future__ import annotations

import math
import re
from collections import Counter


def shingles(text: str) -> set[tuple[str, ...]]:
    """The word 3-grams of `text` (the whole word sequence when it has fewer than three words)."""
    words = re.findall(r"\w+", text)
    if len(words) < 3:
        return {tuple(words)}
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def near_duplicates(texts: list[str], threshold: float) -> dict[int, tuple[int, float]]:
    """Index -> (earlier kept index, Jaccard) for texts whose word 3-gram Jaccard >= threshold.

    Exact set-similarity join with prefix filtering (Chaudhuri et al. 2006; Bayardo et al. 2007): with
    tokens ordered rarest first, two sets with Jaccard >= t share a token among the first
    |x| - ceil(t*|x|) + 1 tokens of each. Only those prefixes are indexed, and candidates are verified
    exactly, so the cost is about linear in the rows for real text (no all-pairs comparison).

    Args:
        texts: normalized questions, in file order (the earlier of two matches is kept).
        threshold: the Jaccard similarity at or above which two texts are near-duplicates.

    Returns:
        For each text that matches an earlier kept text: (that text's index, their Jaccard).
    """
    sets = [shingles(t) for t in texts]
    freq = Counter(tok for s in sets for tok in s)
    rank = {tok: r for r, (tok, _) in enumerate(sorted(freq.items(), key=lambda kv: (kv[1], kv[0])))}
    index: dict[int, list[int]] = {}
    found: dict[int, tuple[int, float]] = {}
    for i, s in enumerate(sets):
        if not s:
            continue
        ordered = sorted(rank[tok] for tok in s)
        prefix = ordered[: len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1]
        best = _first_match(s, sets, sorted({j for tok in prefix for j in index.get(tok, ())}), threshold)
        if best is not None:
            found[i] = best
            continue
        for tok in prefix:
            index.setdefault(tok, []).append(i)
    return found


def _first_match(
    s: set[tuple[str, ...]], sets: list[set[tuple[str, ...]]], candidates: list[int], threshold: float
) -> tuple[int, float] | None:
    """The earliest candidate whose exact Jaccard with `s` reaches the threshold."""
    for j in candidates:
        other = sets[j]
        if not threshold * len(s) <= len(other) <= len(s) / threshold:
            continue  # the size filter: sets this different in size cannot reach the threshold
        score = len(s & other) / len(s | other)
        if score >= threshold:
            return j, score
    return None
