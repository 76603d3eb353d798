"""The forgetting rule: fine-tuning must not cost the base its general language ability.

The classic way a LoRA SFT run regresses is not on the task it trained for but on everything else. The
rule scores base and candidate on held-out general text (documents neither model trained on), as a
perplexity per token, and the candidate's may rise at most `gate.max_general_ppl_increase` (a ratio)
over the base's. A paired bootstrap over documents gives the CI the report shows beside it.

The documents: tasks/plumbing/general_text.py (`eval.general_source`, or the tiny base's held-out
documents that it never trained on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tasks.plumbing.general_text import RULE


def forgetting_rule(
    candidate: Sequence[Sequence[float]],
    base: Sequence[Sequence[float]],
    max_increase: float,
    samples: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """The gate rule from per-document (summed NLL, tokens) of candidate and base on the same tokens."""
    import numpy as np

    cand, ref = np.asarray(candidate, dtype=np.float64), np.asarray(base, dtype=np.float64)
    tokens = ref[:, 1]
    increase = math.exp((cand[:, 0].sum() - ref[:, 0].sum()) / tokens.sum()) - 1
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(ref), size=(samples, len(ref)))
    resampled = np.exp((cand[picks, 0].sum(1) - ref[picks, 0].sum(1)) / tokens[picks].sum(1)) - 1
    tail = (1 - confidence) / 2 * 100
    low, high = (float(x) for x in np.percentile(resampled, [tail, 100 - tail]))
    ppl_c, ppl_b = (math.exp(x[:, 0].sum() / tokens.sum()) for x in (cand, ref))
    return {
        "name": RULE,
        "passed": increase <= max_increase,
        "value": increase,
        "threshold": max_increase,
        "detail": (
            f"perplexity on {len(ref)} held-out general documents ({int(tokens.sum())} tokens): candidate "
            f"{ppl_c:.2f} vs base {ppl_b:.2f}, {increase:+.1%}, {confidence:.0%} CI [{low:+.1%}, {high:+.1%}]; "
            f"at most {max_increase:+.0%} allowed"
        ),
        "perplexity": {"candidate": ppl_c, "base": ppl_b},
        "ci": {"low": low, "high": high},
    }
