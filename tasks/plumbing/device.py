"""Device detection and the per-device training plan (precision, checkpointing, attention, kernels).

Split in two so the decisions are testable without the hardware: :func:`detect_capabilities` reads
torch, :func:`plan_device` decides from a :class:`DeviceCaps` alone. Nothing here is left to library
defaults: TRL 1.x defaults to bf16 + gradient checkpointing, which made a CPU run 21x slower here.

Running as the other kind of CPU: the environment variable ``QA_LORA_CPU_BF16`` forces the detected
native-bf16 capability of a CPU (``1``: as if it had AMX, so `precision: auto` trains in bf16; ``0``: as
if it had none, so auto trains in fp32). Unset (or empty) means detect it from /proc/cpuinfo. It applies
to CPU training only (GPUs report their bf16 support through torch), is inherited by torchrun workers,
and the plan's reasons say when it was used. Any other value is refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass, field
from typing import Literal

Backend = Literal["rocm", "cuda", "cpu"]

# Environment worth setting on ROCm (documented in AMD's tuning guides); only set when absent.
ROCM_ENV = {
    "TORCH_BLAS_PREFER_HIPBLASLT": "1",  # hipBLASLt GEMMs are faster than rocBLAS on MI300X
    "HIP_FORCE_DEV_KERNARG": "1",  # kernel arguments in device memory: lower launch latency
    "PYTORCH_TUNABLEOP_ENABLED": "0",  # opt-in: tuning costs minutes on the first steps
}
CPU_BF16_ENV = "QA_LORA_CPU_BF16"  # "0" | "1": force a CPU's native-bf16 capability off | on


@dataclass(frozen=True)
class DeviceCaps:
    """What the machine can do, as far as training decisions go."""

    backend: Backend
    torch_version: str
    hip_version: str | None = None
    cuda_version: str | None = None
    gpu_names: tuple[str, ...] = ()
    gpu_memory_bytes: tuple[int, ...] = ()
    bf16_native: bool = False  # hardware bf16 matmuls (MI300X, Ampere+, CPUs with AMX/avx512_bf16)
    fp16_native: bool = False
    flash_attn_installed: bool = False
    liger_installed: bool = False  # the liger-kernel package (Triton kernels: GPUs only)
    cpu_count: int = 1
    cpu_flags: tuple[str, ...] = ()
    bf16_forced: bool | None = None  # set when QA_LORA_CPU_BF16 overrode the detected bf16_native


@dataclass(frozen=True)
class DevicePlan:
    """The decisions made for one training run, each with its reason (logged and summarised)."""

    device: str  # the torch device string ("cuda" also on ROCm)
    backend: Backend
    precision: Literal["bf16", "fp16", "fp32"]
    gradient_checkpointing: bool
    attn_implementation: str
    kernels: Literal["none", "liger", "compile"] = "none"
    env: dict[str, str] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _cpu_flags() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return tuple(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ()


def detect_capabilities(requested: Literal["auto", "cpu", "cuda"] = "auto") -> DeviceCaps:
    """Read the machine: torch build (ROCm/CUDA/CPU), GPUs, bf16 support.

    Args:
        requested: `runtime.device`; "cpu" ignores GPUs, "cuda" requires one (ROCm included).
    """
    import importlib.util

    import torch

    from tasks.core.errors import UserError

    hip = getattr(torch.version, "hip", None)
    has_gpu = torch.cuda.is_available() and requested != "cpu"
    if requested == "cuda" and not has_gpu:
        raise UserError(
            "runtime.device: 'cuda' was requested but torch sees no GPU "
            f"(torch {torch.__version__}, built for {'ROCm ' + hip if hip else torch.version.cuda or 'CPU'})"
        )
    flags = _cpu_flags()
    common = dict(
        torch_version=torch.__version__,
        hip_version=hip,
        cuda_version=torch.version.cuda,
        flash_attn_installed=importlib.util.find_spec("flash_attn") is not None,
        liger_installed=importlib.util.find_spec("liger_kernel") is not None,
        cpu_count=os.cpu_count() or 1,
        cpu_flags=tuple(f for f in flags if f in {"avx512_bf16", "amx_bf16", "avx512f", "avx2"}),
    )
    if has_gpu:
        n = torch.cuda.device_count()
        props = [torch.cuda.get_device_properties(i) for i in range(n)]
        return DeviceCaps(
            backend="rocm" if hip else "cuda",
            gpu_names=tuple(p.name for p in props),
            gpu_memory_bytes=tuple(int(p.total_memory) for p in props),
            bf16_native=bool(torch.cuda.is_bf16_supported()),
            fp16_native=True,
            **common,
        )
    forced = cpu_bf16_override()
    return DeviceCaps(
        backend="cpu",
        # AMX tiles (Sapphire Rapids and later) count as native. avx512_bf16 alone (Zen 4) does not: there
        # the default train stage took 162-165 s in bf16 vs 133-146 s in fp32, and the bf16 model answered a
        # little worse (benchmarks/RESULTS.md), although one shape's steps alone ran faster in bf16.
        bf16_native=("amx_bf16" in flags) if forced is None else forced,
        bf16_forced=forced,
        **common,
    )


def cpu_bf16_override() -> bool | None:
    """The CPU bf16 capability forced by ``QA_LORA_CPU_BF16`` (True/False), or None when unset.

    Raises:
        UserError: the variable holds anything but 0, 1 or nothing.
    """
    raw = os.environ.get(CPU_BF16_ENV, "").strip()
    if not raw:
        return None
    if raw not in ("0", "1"):
        from tasks.core.errors import UserError

        raise UserError(
            f"{CPU_BF16_ENV}={raw!r}: expected 1 (run as a CPU with native bf16), 0 (as one without) "
            "or unset (detect it)"
        )
    return raw == "1"


def estimate_train_bytes(
    *,
    total_params: int,
    trainable_params: int,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    seq_len: int,
    micro_batch: int,
    param_bytes: int,
    shards: int = 1,
    checkpointing: bool = False,
) -> int:
    """Rough peak memory of one LoRA training process, for the gradient-checkpointing decision.

    Frozen weights at `param_bytes` (divided by `shards` under FSDP); trainable weights, gradients and
    two AdamW moments in fp32 (16 bytes each); activations kept for the backward pass, ~34 bytes per
    layer, token and hidden unit at 16-bit (Korthikanti et al. 2022, "Reducing Activation
    Recomputation", with SDPA/flash attention so without the seq^2 term), scaled for fp32; fp32
    logits and their gradient. Plus 20% for the allocator and temporaries. A 7B Llama-2 in bf16 at
    batch 4 x 1024 tokens comes to ~40 GiB: no checkpointing on an MI300X (192 GB) or an 80 GB GPU.
    """
    tokens = seq_len * micro_batch
    weights = total_params * param_bytes // max(1, shards)
    optimizer = trainable_params * 16
    layer = tokens * hidden_size * 34 * param_bytes // 2
    activations = (
        num_layers * tokens * hidden_size * param_bytes + layer if checkpointing else num_layers * layer
    )
    logits = tokens * vocab_size * 4 * 2
    return int(1.2 * (weights + optimizer + activations + logits))


def plan_device(
    caps: DeviceCaps,
    precision: str = "auto",
    gradient_checkpointing: str | bool = "auto",
    attn_implementation: str = "auto",
    train_bytes_estimate: int | None = None,
    kernels: str = "none",
) -> DevicePlan:
    """Decide precision, checkpointing, attention and kernels for `caps`.

    Args:
        caps: the machine (real or faked in tests).
        precision: `train.precision`; "auto" picks bf16 where the hardware has it natively, else fp32
            (fp16 is only used when asked: it needs loss scaling and overflows more often).
        gradient_checkpointing: `train.gradient_checkpointing`; "auto" turns it on only when the
            estimated training memory exceeds 80% of the smallest GPU's memory.
        attn_implementation: `train.attn_implementation`; "auto" uses flash-attention 2 where it is
            installed on a GPU, otherwise PyTorch SDPA (AOTriton on ROCm).
        train_bytes_estimate: estimated peak training memory per device, if known.
        kernels: `train.kernels`; "auto" is "none" by this rule (the train stage measures the options
            on GPUs and puts its verdict in the plan); "liger" needs a GPU and the liger-kernel package.

    Returns:
        The plan with a reason for every decision.
    """
    reasons: list[str] = []
    on_gpu = caps.backend in ("rocm", "cuda")
    chosen = _choose_precision(caps, precision, reasons)
    gc = _choose_checkpointing(caps, gradient_checkpointing, train_bytes_estimate, reasons)
    attn = _choose_attention(caps, attn_implementation, reasons)
    fused = _choose_kernels(caps, kernels, reasons)
    env: dict[str, str] = {}
    if caps.backend == "rocm":
        env = {k: v for k, v in ROCM_ENV.items() if k not in os.environ}
        if env:
            reasons.append("ROCm env: " + ", ".join(f"{k}={v}" for k, v in env.items()))

    return DevicePlan(
        device="cuda" if on_gpu else "cpu",
        backend=caps.backend,
        precision=chosen,  # type: ignore[arg-type]
        gradient_checkpointing=gc,
        attn_implementation=attn,
        kernels=fused,  # type: ignore[arg-type]
        env=env,
        reasons=tuple(reasons),
    )


def _choose_precision(caps: DeviceCaps, precision: str, reasons: list[str]) -> str:
    on_gpu = caps.backend in ("rocm", "cuda")
    forced = f", forced by {CPU_BF16_ENV}={int(caps.bf16_forced)}" if caps.bf16_forced is not None else ""
    # A CPU with avx512_bf16 but no AMX has bf16 instructions, yet trains slower in bf16 (not "emulated").
    avx512_bf16_only = "avx512_bf16" in caps.cpu_flags and caps.bf16_forced is None
    if precision == "auto":
        chosen = "bf16" if caps.bf16_native else "fp32"
        if caps.bf16_native:
            why = "native bf16"
        elif avx512_bf16_only:
            why = "avx512_bf16 but no AMX (bf16 trains slower)"
        else:
            why = "no native bf16 (emulated bf16 is slower)"
        reasons.append(f"precision={chosen}: auto on {caps.backend}, {why}{forced}")
        return chosen
    if precision == "bf16" and not caps.bf16_native:
        how = "has avx512_bf16 but no AMX (auto: fp32)" if avx512_bf16_only else "emulates bf16 (slow)"
        reasons.append(f"precision=bf16: requested although this device {how}{forced}")
    elif precision == "fp16" and not on_gpu:
        from tasks.core.errors import UserError

        raise UserError("train.precision: fp16 needs a GPU; use fp32 or auto on CPU")
    else:
        reasons.append(f"precision={precision}: requested")
    return precision


def _choose_checkpointing(
    caps: DeviceCaps, requested: str | bool, train_bytes_estimate: int | None, reasons: list[str]
) -> bool:
    if requested != "auto":
        gc = bool(requested)
        reasons.append(f"gradient_checkpointing={'on' if gc else 'off'}: requested")
        return gc
    on_gpu = caps.backend in ("rocm", "cuda")
    budget = min(caps.gpu_memory_bytes) if caps.gpu_memory_bytes else None
    need = bool(on_gpu and budget and train_bytes_estimate and train_bytes_estimate > 0.8 * budget)
    if need:
        assert budget is not None and train_bytes_estimate is not None
        reasons.append(
            f"gradient_checkpointing=on: estimated {train_bytes_estimate / 2**30:.1f} GiB "
            f"> 80% of {budget / 2**30:.1f} GiB"
        )
    else:
        reasons.append("gradient_checkpointing=off: memory suffices (recompute costs ~30% speed)")
    return need


def _choose_attention(caps: DeviceCaps, requested: str, reasons: list[str]) -> str:
    on_gpu = caps.backend in ("rocm", "cuda")
    if requested == "auto":
        attn = "flash_attention_2" if (on_gpu and caps.flash_attn_installed) else "sdpa"
        reasons.append(f"attn_implementation={attn}: auto")
        return attn
    if requested == "flash_attention_2" and not (on_gpu and caps.flash_attn_installed):
        from tasks.core.errors import UserError

        raise UserError(
            "train.attn_implementation: flash_attention_2 needs a GPU and the flash-attn package; "
            "use sdpa or auto"
        )
    reasons.append(f"attn_implementation={requested}: requested")
    return requested


def _choose_kernels(caps: DeviceCaps, requested: str, reasons: list[str]) -> str:
    on_gpu = caps.backend in ("rocm", "cuda")
    if requested == "auto":
        why = (
            "not measured here (the train stage measures none, liger and compile on the model)"
            if on_gpu
            # Measured 2026-12-03 (tiny base, 2 cores): compiled steps ran ~1.2x faster on one shape, but
            # unpadded CPU batches vary in length and each new one recompiles: 300 steps 242 s vs 78 s eager.
            else "Liger's kernels are Triton (GPUs only); torch.compile recompiles for every new batch length"
        )
        reasons.append(f"kernels=none: auto on {caps.backend}, {why}")
        return "none"
    if requested == "liger" and not (on_gpu and caps.liger_installed):
        from tasks.core.errors import UserError

        raise UserError(
            "train.kernels: liger needs a GPU and the liger-kernel package (pip install liger-kernel, "
            "on the GPU node); use auto, compile or none"
        )
    reasons.append(f"kernels={requested}: requested")
    return requested


def describe_device(requested: Literal["auto", "cpu", "cuda"] = "auto") -> dict[str, object]:
    """The `qa-lora info` report: torch build, backend, GPUs, bf16 support, chosen plan."""
    caps = detect_capabilities(requested)
    plan = plan_device(caps)
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "capabilities": dataclasses.asdict(caps),
        "plan": plan.to_dict(),
    }
