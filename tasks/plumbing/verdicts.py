"""Training choices made by measurement where a device offers more than one (issue #17): the precision
and the kernels (fused Liger kernels, torch.compile or neither).

"Native bf16" says what the hardware can do, not what is faster for a given model: small GEMMs never
amortise the conversions. On an AMX Xeon the tiny model trained at ~8.6k tokens/s in fp32 and ~6.1k in
bf16; on an H100 at 16.7k vs 12.7k. Fused kernels are the same kind of bet: they pay off where
elementwise work, norms and the loss dominate a step (60% of the 1.1B Llama's GPU time on an H100), not
where a compile costs more than it saves. So the caller times a few forward+backward steps of the actual
model at the actual batch shape for each option (:func:`choose` takes that measurement as a function, so
the decision is testable with injected timings), keeps the fastest, and gives ties (within :data:`TIE`)
to the option listed first (the higher precision; no extra kernels). The verdict is cached in a JSON file
per (machine, model shape, batch shape), so it costs seconds once per machine and model.

Nothing here imports torch: the measurement is the caller's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json, write_json_atomic

TIE = 0.05  # another option must be more than 5% faster to be chosen: noise must not flip the verdict
PRECISIONS = ("fp32", "bf16")  # precisions auto may pick, preferred first (fp16 only when asked)
KERNELS = ("none", "liger", "compile")  # kernel options auto may pick, preferred first
CACHE_VERSION = 1  # bump when the measurement changes what a verdict means


@dataclass(frozen=True)
class Verdict:
    """The chosen option of one setting, the measured rates (tokens/s) behind it, and the reason."""

    setting: str  # "precision" | "kernels"
    choice: str
    rates: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    key: str = ""
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def precision_candidates(bf16_native: bool) -> tuple[str, ...]:
    """The precisions worth measuring on a device, highest first (bf16 only where it is native)."""
    return PRECISIONS if bf16_native else ("fp32",)


def kernel_candidates(liger_installed: bool) -> tuple[str, ...]:
    """The kernel options worth measuring on a GPU (Liger only where the package is installed)."""
    return KERNELS if liger_installed else ("none", "compile")


def decide(
    setting: str, rates: Mapping[str, float], preferred: Sequence[str], tie: float = TIE
) -> tuple[str, str]:
    """The option to train with, from measured tokens/s per option, and why.

    The fastest wins; any option within `tie` (relative) of the fastest counts as equally fast, and
    among those the one listed first in `preferred` wins.

    Raises:
        ValueError: no rates, an option not in `preferred`, or a rate that is not a positive number.
    """
    if not rates:
        raise ValueError(f"decide {setting}: no measured rates")
    for name, rate in rates.items():
        if name not in preferred or not rate > 0:
            raise ValueError(f"decide {setting}: bad measurement {name}={rate!r}")
    best = max(rates.values())
    chosen = next(p for p in preferred if p in rates and rates[p] >= best * (1 - tie))
    measured = ", ".join(f"{p} {rates[p]:,.0f}" for p in preferred if p in rates)
    if len(rates) == 1:
        return chosen, f"{setting}={chosen}: the only candidate ({measured} tokens/s)"
    fastest = max(rates, key=lambda p: rates[p])
    why = "fastest" if chosen == fastest else f"within {tie:.0%} of {fastest}: the preferred option wins"
    return chosen, f"{setting}={chosen}: measured {why} ({measured} tokens/s)"


def cache_key(
    machine: Mapping[str, Any], model_shape: Mapping[str, Any], batch_shape: tuple[int, int]
) -> str:
    """The cache key of a verdict: what decides which option is faster.

    Args:
        machine: the device facts that change the kernels (backend, GPU names, CPU flags, core and
            thread counts, torch version, a forced bf16 capability).
        model_shape: the model's shape (type, layers, hidden size, heads, vocab, LoRA rank and targets,
            and for the kernels the precision they run in).
        batch_shape: (micro batch, sequence length) measured.
    """
    blob = {"v": CACHE_VERSION, "machine": machine, "model": model_shape, "batch": list(batch_shape)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def choose(
    setting: str,
    options: Sequence[str],
    measure: Callable[[str], float],
    *,
    key: str,
    cache_file: Path | None,
    about: Mapping[str, Any] | None = None,
) -> Verdict:
    """The measured verdict on `setting` for one (machine, model, batch) `key`, cached in `cache_file`.

    Args:
        setting: what is chosen ("precision" or "kernels"), for the reason and the verdict.
        options: the candidates, preferred first (ties go to the earlier one); one option is returned
            unmeasured.
        measure: tokens/s of a few training steps with the given option.
        key: :func:`cache_key` of this machine, model and batch.
        cache_file: the JSON file holding verdicts by key; None measures every time.
        about: what was measured, in words a person reads (`qa-lora info` lists it with the verdict).
    """
    if len(options) == 1:
        return Verdict(
            setting, options[0], {}, f"{setting}={options[0]}: the only candidate, not measured", key
        )
    cache = _read_cache(cache_file)
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("choice") in options:
        return Verdict(
            setting, hit["choice"], dict(hit.get("rates", {})), str(hit.get("reason", "")), key, cached=True
        )
    rates = {option: float(measure(option)) for option in options}
    choice, reason = decide(setting, rates, options)
    if cache_file is not None:
        cache[key] = {"choice": choice, "rates": rates, "reason": reason, "about": dict(about or {})}
        write_json_atomic(cache_file, cache)
    return Verdict(setting, choice, rates, reason, key)


def cached_verdicts(cache_file: Path) -> list[dict[str, Any]]:
    """The verdicts measured on this machine so far (what `qa-lora info` prints), oldest first."""
    return [
        {"key": key, **{k: entry.get(k) for k in ("about", "choice", "rates", "reason")}}
        for key, entry in _read_cache(cache_file).items()
        if isinstance(entry, dict)
    ]


def _read_cache(cache_file: Path | None) -> dict[str, Any]:
    if cache_file is None:
        return {}
    try:
        data = read_json(cache_file)
    except (OSError, ValueError):
        return {}  # missing or damaged: measure again (a cache must never decide wrongly)
    return data if isinstance(data, dict) else {}
