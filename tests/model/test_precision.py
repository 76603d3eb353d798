"""Precision chosen by measurement: the decision with injected timings, and the verdict cache's key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.plumbing.verdicts import PRECISIONS, cache_key, choose, decide, precision_candidates

MACHINE = {"backend": "cpu", "cpu_flags": ["amx_bf16", "avx512_bf16"], "cpu_count": 2, "torch": "2.13.0"}
MODEL = {"model_type": "llama", "layers": 4, "hidden": 256, "vocab": 8192, "lora_r": 8}


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ({"fp32": 8_600.0, "bf16": 6_100.0}, "fp32"),  # AMX Xeon, tiny model (issue #17)
        ({"fp32": 10_000.0, "bf16": 13_000.0}, "bf16"),  # bf16 clearly faster
        ({"fp32": 10_000.0, "bf16": 10_400.0}, "fp32"),  # 4% faster: a tie, the higher precision wins
        ({"fp32": 10_000.0, "bf16": 10_600.0}, "bf16"),  # 6% faster: beyond the tie margin
        ({"fp32": 5.0}, "fp32"),
    ],
)
def test_the_faster_precision_wins_and_ties_go_to_the_higher(rates: dict[str, float], expected: str) -> None:
    chosen, reason = decide("precision", rates, PRECISIONS)
    assert chosen == expected
    assert reason.startswith(f"precision={expected}:") and "tokens/s" in reason


@pytest.mark.parametrize("rates", [{}, {"fp16": 1.0}, {"fp32": 0.0}, {"fp32": float("nan")}])
def test_a_bad_measurement_is_refused(rates: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="decide"):
        decide("precision", rates, PRECISIONS)


def test_only_native_precisions_are_candidates() -> None:
    assert precision_candidates(bf16_native=True) == ("fp32", "bf16")
    assert precision_candidates(bf16_native=False) == ("fp32",)


def test_the_verdict_is_measured_once_per_key_and_cached(tmp_path: Path) -> None:
    cache = tmp_path / "precision.json"
    calls: list[str] = []

    def measure(precision: str) -> float:
        calls.append(precision)
        return {"fp32": 9_000.0, "bf16": 12_000.0}[precision]

    key = cache_key(MACHINE, MODEL, (8, 128))
    first = choose("precision", PRECISIONS, measure, key=key, cache_file=cache)
    assert (first.choice, first.cached, sorted(calls)) == ("bf16", False, ["bf16", "fp32"])
    assert first.rates == {"fp32": 9_000.0, "bf16": 12_000.0}

    again = choose("precision", PRECISIONS, measure, key=key, cache_file=cache)
    assert (again.choice, again.cached, again.rates) == ("bf16", True, first.rates)
    assert len(calls) == 2  # no new measurement

    other = choose(
        "precision", PRECISIONS, measure, key=cache_key(MACHINE, MODEL, (16, 128)), cache_file=cache
    )
    assert not other.cached and len(calls) == 4  # another batch shape is measured on its own

    cache.write_text("{not json")  # a damaged cache is measured again, never trusted
    assert not choose("precision", PRECISIONS, measure, key=key, cache_file=cache).cached


def test_without_native_bf16_nothing_is_measured(tmp_path: Path) -> None:
    def measure(precision: str) -> float:
        raise AssertionError("measured although fp32 is the only candidate")

    verdict = choose(
        "precision", precision_candidates(False), measure, key="k", cache_file=tmp_path / "c.json"
    )
    assert verdict.choice == "fp32" and verdict.rates == {}
    assert not (tmp_path / "c.json").exists()


def test_the_cache_key_changes_with_machine_model_and_batch_only() -> None:
    key = cache_key(MACHINE, MODEL, (8, 128))
    assert cache_key(dict(reversed(list(MACHINE.items()))), dict(MODEL), (8, 128)) == key  # order-free
    assert cache_key({**MACHINE, "cpu_flags": ["avx2"]}, MODEL, (8, 128)) != key  # another CPU
    assert cache_key({**MACHINE, "torch": "2.14.0"}, MODEL, (8, 128)) != key  # other kernels
    assert cache_key(MACHINE, {**MODEL, "hidden": 512}, (8, 128)) != key  # another model shape
    assert cache_key(MACHINE, MODEL, (8, 256)) != key and cache_key(MACHINE, MODEL, (4, 128)) != key


def test_the_train_stage_measures_both_precisions_on_a_bf16_device(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe really trains the tiny base in fp32 and bf16 (a native-bf16 CPU faked), records both
    rates, puts its reason first in the plan, and a second call reads the cache instead of measuring."""
    import dataclasses
    import json

    from tasks.core.config import REPO_ROOT, load_config
    from tasks.core.layout import RunLayout
    from tasks.plumbing.device import CPU_BF16_ENV, detect_capabilities, plan_device
    from tasks.plumbing.loading import resolve_base
    from tasks.stages.train.model import inspect_base
    from tasks.stages.train.probe import apply_verdict, cache_file, precision_verdict

    monkeypatch.setenv("QA_LORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    layout = RunLayout.of(tmp_path / "run")
    layout.data_dir.mkdir(parents=True)
    lines = (REPO_ROOT / "data" / "qa.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    layout.train_split.write_text("".join(json.dumps(json.loads(x)) + "\n" for x in lines), encoding="utf-8")
    cfg = load_config(
        overrides=["base.kind=hub", f"base.name_or_path={tiny_base}", "train.per_device_train_batch_size=4"]
    )
    base = resolve_base(cfg)
    info = inspect_base(cfg, base)
    caps = dataclasses.replace(detect_capabilities("cpu"), bf16_native=True)

    verdict = precision_verdict(cfg, layout, base, info, caps)
    assert verdict is not None and not verdict.cached
    assert set(verdict.rates) == {"fp32", "bf16"} and all(r > 0 for r in verdict.rates.values())
    assert verdict.choice in verdict.rates
    plan = apply_verdict(plan_device(caps, verdict.choice), verdict)
    assert plan.reasons[0] == verdict.reason and plan.precision == verdict.choice
    assert verdict.key in json.loads(cache_file().read_text())

    again = precision_verdict(cfg, layout, base, info, caps)
    assert again is not None and again.cached and again.choice == verdict.choice
    # `qa-lora info` prints what was measured on this machine, with the verdict and its reason
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "tasks.runners.cli", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )
    assert proc.returncode == 0, proc.stderr
    (shown,) = json.loads(proc.stdout)["precision_verdicts"]["measured"]
    assert shown["key"] == verdict.key and shown["reason"] == verdict.reason
    assert shown["about"]["batch"].startswith("4 x ")  # train.per_device_train_batch_size=4
    assert str(info["total_params"]) in shown["about"]["model"]
    # Nothing to measure: explicit precision, no native bf16, or a forced capability.
    assert (
        precision_verdict(load_config(overrides=["train.precision=fp32"]), layout, base, info, caps) is None
    )
    assert precision_verdict(cfg, layout, base, info, dataclasses.replace(caps, bf16_native=False)) is None
    assert precision_verdict(cfg, layout, base, info, dataclasses.replace(caps, bf16_forced=True)) is None
    too_small = dataclasses.replace(caps, gpu_memory_bytes=(4 * info["total_params"],))  # fp32 weights > half
    assert precision_verdict(cfg, layout, base, info, too_small) is None


def _summary(verdict: str | None, backend: str = "cpu") -> dict:
    measured = {"choice": verdict, "rates": {"fp32": 1.0, "bf16": 0.5}} if verdict else None
    return {"precision": verdict or "bf16", "precision_verdict": measured, "device": {"backend": backend}}


@pytest.mark.parametrize(
    ("native", "precision", "trained", "expected"),
    [
        ("1", "auto", _summary("fp32"), "float32"),  # measured fp32 faster here: scored as it trained
        ("1", "auto", _summary("bf16"), "bfloat16"),
        ("1", "auto", None, "bfloat16"),  # no train summary: the device plan's rule
        ("1", "auto", _summary("fp32", backend="rocm"), "bfloat16"),  # trained on a GPU node: the rule here
        ("0", "auto", _summary(None), "float32"),  # nothing measured without native bf16
        ("1", "fp32", _summary(None), "float32"),  # explicit precisions are obeyed
        ("0", "bf16", _summary(None), "bfloat16"),
    ],
)
def test_evaluation_scores_in_the_precision_the_candidate_trained_in(
    monkeypatch: pytest.MonkeyPatch, native: str, precision: str, trained: dict | None, expected: str
) -> None:
    from tasks.core.config import load_config
    from tasks.plumbing.device import CPU_BF16_ENV
    from tasks.stages.evaluate.scoring import plan_eval_device

    monkeypatch.setenv(CPU_BF16_ENV, native)  # the capability faked: what an AMX CPU reports, or not
    cfg = load_config(overrides=[("runtime.device", "cpu"), ("train.precision", precision)])
    assert plan_eval_device(cfg, trained) == ("cpu", expected)
