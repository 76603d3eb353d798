"""Fused kernels chosen by measurement (`train.kernels`, issue #17 item 5) with the GPU faked.

Liger's kernels are Triton and need a GPU, which this machine does not have: the deciding code is tested
with DeviceCaps describing an MI300X and the measurement injected. (The probe's torch.compile path runs on
a CPU too; it was run by hand, not here: compiling the tiny model's training step takes ~70 s on 2 cores.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from tasks.core.errors import UserError
from tasks.plumbing.device import DeviceCaps, plan_device
from tasks.plumbing.verdicts import KERNELS, decide, kernel_candidates

GiB = 2**30
MI300X = DeviceCaps(
    backend="rocm",
    torch_version="2.13.0",
    hip_version="6.4",
    gpu_names=("AMD Instinct MI300X",),
    gpu_memory_bytes=(192 * GiB,),
    bf16_native=True,
    fp16_native=True,
    cpu_count=64,
)
CPU = DeviceCaps(backend="cpu", torch_version="2.13.0", cpu_count=2, cpu_flags=("avx2",))


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ({"none": 10_000.0, "liger": 13_000.0, "compile": 12_000.0}, "liger"),
        ({"none": 10_000.0, "liger": 10_400.0, "compile": 10_300.0}, "none"),  # within 5%: none wins
        ({"none": 10_000.0, "compile": 11_000.0}, "compile"),  # no Liger installed
        ({"none": 10_000.0, "liger": 12_000.0, "compile": 12_400.0}, "liger"),  # liger before compile
    ],
)
def test_the_fastest_kernels_win_and_ties_go_to_none(rates: dict[str, float], expected: str) -> None:
    chosen, reason = decide("kernels", rates, KERNELS)
    assert chosen == expected and reason.startswith(f"kernels={expected}: measured")


def test_liger_is_a_candidate_only_where_it_is_installed() -> None:
    assert kernel_candidates(liger_installed=True) == ("none", "liger", "compile")
    assert kernel_candidates(liger_installed=False) == ("none", "compile")


def test_the_device_plan_obeys_explicit_kernels_and_refuses_liger_without_a_gpu() -> None:
    cpu = plan_device(CPU, kernels="auto")
    assert cpu.kernels == "none" and any(r.startswith("kernels=none: auto on cpu") for r in cpu.reasons)
    gpu = plan_device(MI300X, kernels="auto")  # the rule; the train stage's measurement replaces it
    assert gpu.kernels == "none" and any("not measured here" in r for r in gpu.reasons)
    assert plan_device(CPU, kernels="compile").kernels == "compile"
    assert plan_device(dataclasses.replace(MI300X, liger_installed=True), kernels="liger").kernels == "liger"
    for caps in (CPU, dataclasses.replace(CPU, liger_installed=True), MI300X):
        with pytest.raises(
            UserError, match=r"train\.kernels: liger needs a GPU and the liger-kernel package"
        ):
            plan_device(caps, kernels="liger")


@pytest.mark.parametrize(
    ("caps", "kernels", "expected"),
    [
        (MI300X, "compile", dict(torch_compile=True, use_liger_kernel=False, pad_to_multiple_of=64)),
        (
            dataclasses.replace(MI300X, liger_installed=True),
            "liger",
            dict(torch_compile=False, use_liger_kernel=True),
        ),
        (MI300X, "none", dict(torch_compile=False, use_liger_kernel=False)),
        (CPU, "auto", dict(torch_compile=False, use_liger_kernel=False, pad_to_multiple_of=None)),
    ],
)
def test_the_trainer_gets_the_planned_kernels(caps: DeviceCaps, kernels: str, expected: dict) -> None:
    from tasks.stages.train.trainer import device_args

    args = device_args(plan_device(caps, kernels=kernels), 1, "ddp", cpu_count=16)
    for key, value in expected.items():
        assert args[key] == value, key


def _probe_inputs(tiny_base: Path, tmp_path: Path, *overrides: str) -> tuple[Any, Any, Any, dict]:
    from tasks.core.config import REPO_ROOT, load_config
    from tasks.core.layout import RunLayout
    from tasks.plumbing.loading import resolve_base
    from tasks.stages.train.model import inspect_base

    layout = RunLayout.of(tmp_path / "run")
    layout.data_dir.mkdir(parents=True)
    lines = (REPO_ROOT / "data" / "qa.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    layout.train_split.write_text("".join(json.dumps(json.loads(x)) + "\n" for x in lines), encoding="utf-8")
    cfg = load_config(
        overrides=[
            "base.kind=hub",
            f"base.name_or_path={tiny_base}",
            "train.per_device_train_batch_size=4",
            *overrides,
        ]
    )
    base = resolve_base(cfg)
    return cfg, layout, base, inspect_base(cfg, base)


def test_auto_measures_the_kernels_on_a_gpu_in_the_chosen_precision_and_caches_them(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU and its rates are faked (the measurement cannot run here); the decision, the cache and
    what the plan and the Trainer get are the real code's."""
    from tasks.core.config import load_config
    from tasks.plumbing.verdicts import cached_verdicts
    from tasks.stages.train import probe
    from tasks.stages.train.trainer import device_args

    monkeypatch.setenv("QA_LORA_CACHE_DIR", str(tmp_path / "cache"))
    cfg, layout, base, info = _probe_inputs(tiny_base, tmp_path)
    measured: list[tuple[str, str]] = []
    rates = {"none": 10_000.0, "liger": 12_500.0, "compile": 14_000.0}

    def fake_rate(cfg: Any, base: Any, caps: Any, precision: str, shape: Any, kernels: str = "none") -> float:
        measured.append((precision, kernels))
        return rates[kernels]

    monkeypatch.setattr(probe, "measure_rate", fake_rate)
    caps = dataclasses.replace(MI300X, liger_installed=True)
    verdict = probe.kernels_verdict(cfg, layout, base, info, caps, "bf16")
    assert verdict is not None and verdict.choice == "compile" and not verdict.cached
    assert measured == [("bf16", "none"), ("bf16", "liger"), ("bf16", "compile")]
    plan = probe.apply_verdict(plan_device(caps, "bf16", kernels="auto"), verdict)
    assert plan.kernels == "compile" and verdict.reason in plan.reasons
    assert not any("not measured here" in r for r in plan.reasons)  # the rule's reason is replaced
    assert device_args(plan, 1, "ddp", cpu_count=64)["torch_compile"] is True

    again = probe.kernels_verdict(cfg, layout, base, info, caps, "bf16")
    assert again is not None and again.cached and again.choice == "compile" and len(measured) == 3
    other = probe.kernels_verdict(cfg, layout, base, info, caps, "fp32")  # kernels differ per precision
    assert other is not None and not other.cached and len(measured) == 6
    assert {v["key"] for v in cached_verdicts(probe.cache_file("kernels"))} == {verdict.key, other.key}
    # Nothing measured: explicit kernels, a CPU, or a model too big to probe on one device.
    explicit = load_config(
        overrides=["base.kind=hub", f"base.name_or_path={tiny_base}", "train.kernels=none"]
    )
    assert probe.kernels_verdict(explicit, layout, base, info, caps, "bf16") is None
    assert probe.kernels_verdict(cfg, layout, base, info, CPU, "fp32") is None
    too_small = dataclasses.replace(caps, gpu_memory_bytes=(4 * info["total_params"],))
    assert probe.kernels_verdict(cfg, layout, base, info, too_small, "bf16") is None
    assert len(measured) == 6
