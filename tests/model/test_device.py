"""Device decisions (precision, gradient checkpointing, attention, ROCm env) with the machine faked.

The deciding code never reads the hardware itself: DeviceCaps describes an MI300X, an A100, a V100 or
a CPU here, and the plan plus the SFTConfig fields derived from it are checked for each. The detection
of this machine is checked against /proc/cpuinfo read here, and QA_LORA_CPU_BF16 must flip it both ways.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tasks.core.errors import UserError
from tasks.plumbing.device import (
    CPU_BF16_ENV,
    ROCM_ENV,
    DeviceCaps,
    detect_capabilities,
    estimate_train_bytes,
    plan_device,
)

GiB = 2**30


def _caps(kind: str, **over: Any) -> DeviceCaps:
    base: dict[str, dict[str, Any]] = {
        "mi300x": dict(
            backend="rocm",
            hip_version="6.4",
            gpu_names=("AMD Instinct MI300X",),
            gpu_memory_bytes=(192 * GiB,),
            bf16_native=True,
            fp16_native=True,
        ),
        "a100": dict(
            backend="cuda",
            cuda_version="12.8",
            gpu_names=("NVIDIA A100-SXM4-40GB",),
            gpu_memory_bytes=(40 * GiB,),
            bf16_native=True,
            fp16_native=True,
        ),
        "v100": dict(
            backend="cuda",
            cuda_version="12.8",
            gpu_names=("Tesla V100-SXM2-16GB",),
            gpu_memory_bytes=(16 * GiB,),
            bf16_native=False,
            fp16_native=True,
        ),
        "cpu": dict(backend="cpu", cpu_count=2, cpu_flags=("avx2",)),
        "cpu-amx": dict(backend="cpu", cpu_count=64, cpu_flags=("amx_bf16", "avx512_bf16"), bf16_native=True),
    }
    return DeviceCaps(torch_version="2.13.0", **{**base[kind], **over})


LLAMA2_7B = dict(
    total_params=6_738_415_616,
    trainable_params=33_554_432,  # r=64 on q_proj, v_proj
    num_layers=32,
    hidden_size=4096,
    vocab_size=32000,
    seq_len=1024,
    micro_batch=4,
)


@pytest.mark.parametrize(
    ("kind", "precision"),
    [("mi300x", "bf16"), ("a100", "bf16"), ("v100", "fp32"), ("cpu", "fp32"), ("cpu-amx", "bf16")],
)
def test_auto_precision_follows_native_bf16(kind: str, precision: str) -> None:
    plan = plan_device(_caps(kind))
    assert plan.precision == precision
    assert plan.device == ("cpu" if kind.startswith("cpu") else "cuda")  # ROCm is addressed as cuda
    assert any(r.startswith(f"precision={precision}") for r in plan.reasons)


def test_requested_precisions() -> None:
    assert plan_device(_caps("v100"), precision="fp16").precision == "fp16"
    assert plan_device(_caps("mi300x"), precision="fp32").precision == "fp32"
    slow = plan_device(_caps("cpu"), precision="bf16")
    assert slow.precision == "bf16" and any("emulates bf16" in r for r in slow.reasons)
    zen4 = plan_device(_caps("cpu", cpu_flags=("avx2", "avx512f", "avx512_bf16")), precision="bf16")
    assert zen4.precision == "bf16" and any("avx512_bf16 but no AMX" in r for r in zen4.reasons)
    auto = plan_device(_caps("cpu", cpu_flags=("avx512_bf16",)))  # no AMX: fp32, and the log says why
    assert auto.precision == "fp32" and any(
        "avx512_bf16 but no AMX (bf16 trains slower)" in r for r in auto.reasons
    )
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        plan_device(_caps("cpu"), precision="fp16")


def test_gradient_checkpointing_only_when_memory_needs_it() -> None:
    need_7b = estimate_train_bytes(**LLAMA2_7B, param_bytes=2)
    assert 25 * GiB < need_7b < 60 * GiB
    # The reference recipe on an MI300X (192 GB): no recompute. On a 40 GB A100 it does not fit in 80%.
    assert not plan_device(_caps("mi300x"), train_bytes_estimate=need_7b).gradient_checkpointing
    a100 = plan_device(_caps("a100"), train_bytes_estimate=need_7b)
    assert a100.gradient_checkpointing and any("> 80%" in r for r in a100.reasons)
    # Never on a CPU by default (TRL's default made a CPU run 21x slower here), whatever the estimate.
    assert not plan_device(_caps("cpu"), train_bytes_estimate=10**15).gradient_checkpointing
    assert plan_device(_caps("mi300x"), gradient_checkpointing=True).gradient_checkpointing
    assert not plan_device(
        _caps("a100"), gradient_checkpointing=False, train_bytes_estimate=need_7b
    ).gradient_checkpointing


def test_training_memory_estimate_scales_with_its_inputs() -> None:
    small = estimate_train_bytes(**LLAMA2_7B, param_bytes=2)
    assert estimate_train_bytes(**{**LLAMA2_7B, "micro_batch": 8}, param_bytes=2) > small
    assert estimate_train_bytes(**LLAMA2_7B, param_bytes=4) > small
    assert estimate_train_bytes(**LLAMA2_7B, param_bytes=2, shards=8) < small  # FSDP shards the weights


def test_attention_implementation() -> None:
    assert plan_device(_caps("mi300x", flash_attn_installed=True)).attn_implementation == "flash_attention_2"
    assert plan_device(_caps("mi300x")).attn_implementation == "sdpa"
    assert plan_device(_caps("cpu", flash_attn_installed=True)).attn_implementation == "sdpa"
    assert plan_device(_caps("a100"), attn_implementation="eager").attn_implementation == "eager"
    with pytest.raises(UserError, match="flash_attention_2 needs a GPU"):
        plan_device(_caps("cpu"), attn_implementation="flash_attention_2")


def test_rocm_environment_only_on_rocm(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ROCM_ENV:
        monkeypatch.delenv(key, raising=False)
    rocm = plan_device(_caps("mi300x"))
    assert rocm.env == ROCM_ENV and any(r.startswith("ROCm env") for r in rocm.reasons)
    assert plan_device(_caps("a100")).env == {}
    monkeypatch.setenv("PYTORCH_TUNABLEOP_ENABLED", "1")  # the operator's own choice is kept
    assert "PYTORCH_TUNABLEOP_ENABLED" not in plan_device(_caps("mi300x")).env


@pytest.mark.parametrize(
    ("kind", "world", "distributed", "expected"),
    [
        (
            "cpu",
            1,
            "ddp",
            dict(use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False, ddp_backend=None),
        ),
        (
            "cpu",
            2,
            "ddp",
            dict(use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0, pad_to_multiple_of=None),
        ),
        (
            "mi300x",
            1,
            "ddp",
            dict(use_cpu=False, bf16=True, fp16=False, pad_to_multiple_of=64, dataloader_pin_memory=True),
        ),
        (
            "mi300x",
            8,
            "ddp",
            dict(use_cpu=False, bf16=True, ddp_backend="nccl", ddp_find_unused_parameters=False),
        ),
        ("v100", 1, "ddp", dict(bf16=False, fp16=False)),
    ],
)
def test_sft_config_fields_come_from_the_plan(
    kind: str, world: int, distributed: str, expected: dict
) -> None:
    """TRL's defaults (bf16=True, gradient checkpointing on) never stand: every field is explicit."""
    from tasks.stages.train.trainer import device_args

    args = device_args(plan_device(_caps(kind)), world, distributed, cpu_count=16)
    for key, value in expected.items():
        assert args[key] == value, key
    for key in ("use_cpu", "bf16", "fp16", "activation_checkpointing"):
        assert key in args


def test_fsdp_uses_its_own_activation_checkpointing() -> None:
    from tasks.stages.train.trainer import device_args

    need = estimate_train_bytes(
        **{**LLAMA2_7B, "total_params": 70 * 10**9, "num_layers": 80, "hidden_size": 8192}, param_bytes=2
    )
    plan = plan_device(_caps("mi300x"), train_bytes_estimate=need)
    args = device_args(plan, 8, "fsdp", cpu_count=128)
    assert args["fsdp"] is True and args["fsdp_config"]["version"] == 2
    assert args["fsdp_config"]["activation_checkpointing"] == plan.gradient_checkpointing
    assert args["activation_checkpointing"] is False  # the Trainer flag would add an all-gather
    assert "fsdp" not in device_args(plan, 1, "fsdp", cpu_count=128)  # one process: nothing to shard


# ------------------------------------------------------------ this machine, and running as the other kind


def _has_amx() -> bool:
    """Read here, independently of the module: AMX tiles are what the plan counts as native CPU bf16."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return any("amx_bf16" in line.split() for line in text.splitlines() if line.startswith("flags"))


def test_cpu_bf16_is_detected_from_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    caps = detect_capabilities("cpu")
    assert caps.backend == "cpu"
    assert caps.bf16_native is _has_amx() and caps.bf16_forced is None
    assert plan_device(caps).precision == ("bf16" if _has_amx() else "fp32")


@pytest.mark.parametrize(("value", "native", "precision"), [("1", True, "bf16"), ("0", False, "fp32")])
def test_cpu_bf16_can_be_forced_either_way(
    monkeypatch: pytest.MonkeyPatch, value: str, native: bool, precision: str
) -> None:
    """Whatever this CPU is, the variable makes it run as the other kind too (and the plan says so)."""
    monkeypatch.setenv(CPU_BF16_ENV, value)
    caps = detect_capabilities("cpu")
    assert caps.bf16_native is native and caps.bf16_forced is native
    plan = plan_device(caps)
    assert plan.precision == precision
    assert any(
        r.startswith(f"precision={precision}") and f"{CPU_BF16_ENV}={value}" in r for r in plan.reasons
    )
    # An explicit precision is still obeyed.
    assert plan_device(caps, precision="fp32").precision == "fp32"


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_a_bad_cpu_bf16_value_is_a_one_line_user_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, value)
    with pytest.raises(UserError, match=rf"^{CPU_BF16_ENV}='{value}': expected 1 .* or unset \(detect it\)$"):
        detect_capabilities("cpu")
