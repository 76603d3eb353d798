"""Training precision chosen by measurement, for devices that offer more than one (issue #17).

"Native bf16" says what the hardware can do, not what is faster for a given model: small GEMMs never
amortise the conversions. On an AMX Xeon the tiny model trained at ~8.6k tokens/s in fp32 and ~6.1k in
bf16; on an H100 at 16.7k vs 12.7k. So where a device supports more than one precision, the caller times
a few forward+backward steps of the actual model at the actual batch shape in each (:func:`choose_precision`
takes that measurement as a function, so the decision is testable with injected timings), keeps the
faster, and gives ties (within :data:`TIE`) to the higher precision. The verdict is cached in a JSON file
per (machine, model shape, batch shape), so it costs seconds once per machine and model.

Nothing here imports torch: the measurement is the caller's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json, write_json_atomic

TIE = 0.05  # a lower precision must be more than 5% faster to be chosen: noise must not flip the verdict
HIGHER_FIRST = ("fp32", "bf16")  # precisions auto may pick, highest first (fp16 only when asked)
CACHE_VERSION = 1  # bump when the measurement changes what a verdict means


@dataclass(frozen=True)
class Verdict:
    """The chosen precision, the measured rates (tokens/s) behind it, and the reason, for the plan."""

    precision: str
    rates: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    key: str = ""
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidates(bf16_native: bool) -> tuple[str, ...]:
    """The precisions worth measuring on a device, highest first (bf16 only where it is native)."""
    return HIGHER_FIRST if bf16_native else ("fp32",)


def decide(rates: Mapping[str, float], tie: float = TIE) -> tuple[str, str]:
    """The precision to train in, from measured tokens/s per precision, and why.

    The fastest wins; any precision within `tie` (relative) of the fastest counts as equally fast, and
    among those the highest precision wins.

    Raises:
        ValueError: no rates, a precision auto may not pick, or a rate that is not a positive number.
    """
    if not rates:
        raise ValueError("decide: no measured rates")
    for name, rate in rates.items():
        if name not in HIGHER_FIRST or not rate > 0:
            raise ValueError(f"decide: bad measurement {name}={rate!r}")
    best = max(rates.values())
    chosen = next(p for p in HIGHER_FIRST if p in rates and rates[p] >= best * (1 - tie))
    measured = ", ".join(f"{p} {rates[p]:,.0f}" for p in HIGHER_FIRST if p in rates)
    if len(rates) == 1:
        return chosen, f"precision={chosen}: the only candidate ({measured} tokens/s)"
    fastest = max(rates, key=lambda p: rates[p])
    why = "fastest" if chosen == fastest else f"within {tie:.0%} of {fastest}: the higher precision wins"
    return chosen, f"precision={chosen}: measured {why} ({measured} tokens/s)"


def cache_key(
    machine: Mapping[str, Any], model_shape: Mapping[str, Any], batch_shape: tuple[int, int]
) -> str:
    """The cache key of a verdict: what decides which precision is faster.

    Args:
        machine: the device facts that change the kernels (backend, GPU names, CPU flags, core and
            thread counts, torch version, a forced bf16 capability).
        model_shape: the model's shape (type, layers, hidden size, heads, vocab, LoRA rank and targets).
        batch_shape: (micro batch, sequence length) measured.
    """
    blob = {"v": CACHE_VERSION, "machine": machine, "model": model_shape, "batch": list(batch_shape)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def choose_precision(
    bf16_native: bool,
    measure: Callable[[str], float],
    *,
    key: str,
    cache_file: Path | None,
    about: Mapping[str, Any] | None = None,
) -> Verdict:
    """The measured precision verdict for one (machine, model, batch) `key`, cached in `cache_file`.

    Args:
        bf16_native: whether the device has native bf16 (else fp32 is the only candidate, unmeasured).
        measure: tokens/s of a few training steps in the given precision ("fp32" or "bf16").
        key: :func:`cache_key` of this machine, model and batch.
        cache_file: the JSON file holding verdicts by key; None measures every time.
        about: what was measured, in words a person reads (`qa-lora info` lists it with the verdict).
    """
    options = candidates(bf16_native)
    if len(options) == 1:
        return Verdict(options[0], {}, f"precision={options[0]}: no native bf16, nothing to measure", key)
    cache = _read_cache(cache_file)
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("precision") in options:
        return Verdict(
            hit["precision"], dict(hit.get("rates", {})), str(hit.get("reason", "")), key, cached=True
        )
    rates = {p: float(measure(p)) for p in options}
    precision, reason = decide(rates)
    verdict = Verdict(precision, rates, reason, key)
    if cache_file is not None:
        cache[key] = {"precision": precision, "rates": rates, "reason": reason, "about": dict(about or {})}
        write_json_atomic(cache_file, cache)
    return verdict


def cached_verdicts(cache_file: Path) -> list[dict[str, Any]]:
    """The verdicts measured on this machine so far (what `qa-lora info` prints), oldest first."""
    return [
        {"key": key, **{k: entry.get(k) for k in ("about", "precision", "rates", "reason")}}
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
