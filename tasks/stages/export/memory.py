"""Memory: refuse a machine that cannot hold the export before anything loads, and pick the merge device.

Parameter count comes from the base's config (the architecture built on the meta device, no weights);
the plan itself (:func:`plan_memory`) is pure numbers in, decision out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.plumbing.loading import hub_kwargs

# Copies of the fp32 weights held in RAM at the peak: the torch model, the ONNX graph being built
# (its initializers), and the ONNX Runtime session of the parity check (loaded after torch is freed,
# but a variant conversion can hold one more). 10% headroom for activations and the allocator.
CPU_COPIES = 3.0
GPU_MERGE_COPIES = 1.2  # the base on the GPU, merged in place; LoRA weights and activations are small
HEADROOM = 1.1
_GIB = 2**30


def load_base_config(cfg: Config, base_src: str) -> Any:
    """The base model's `AutoConfig`, refusing a quantized checkpoint.

    Args:
        cfg: reads `base` (revision, remote-code policy, the name for messages).
        base_src: what `resolve_base(cfg).ref` returned (a local directory or a hub id).

    Raises:
        UserError: the checkpoint is quantized (merging into rounded weights degrades quality).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_src, **hub_kwargs(cfg))
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, Mapping) else type(quant).__name__
        raise UserError(
            f"base.name_or_path: {cfg.base.name_or_path} is a quantized checkpoint ({method}); merging into "
            "quantized weights degrades quality, point base.name_or_path at the full-precision model"
        )
    return config


def plan_export_memory(cfg: Config, base_src: str) -> dict[str, Any]:
    """:func:`plan_memory` for this machine: the base's parameter count, free RAM and GPU memory."""
    model_config = load_base_config(cfg, base_src)
    return plan_memory(
        count_parameters(model_config),
        requested_device=cfg.runtime.device,
        cpu_available=cpu_available(),
        gpu_available=gpu_available(cfg.runtime.device),
    )


def plan_memory(
    n_params: int,
    requested_device: str,
    cpu_available: int,
    gpu_available: int | None,
) -> dict[str, Any]:
    """Decide where to merge and refuse a machine that cannot hold the export (pure: numbers in).

    Args:
        n_params: parameter count of the base model.
        requested_device: `runtime.device` ("auto", "cpu", "cuda").
        cpu_available: free RAM in bytes.
        gpu_available: free memory of GPU 0 in bytes, or None without a GPU.

    Returns:
        Bytes needed and available, the merge device and the reason.

    Raises:
        UserError: the RAM cannot hold the fp32 weights CPU_COPIES times over (ONNX export runs on CPU).
    """
    weights = n_params * 4  # fp32: merging is done at full precision
    cpu_need = int(weights * CPU_COPIES * HEADROOM)
    gpu_need = int(weights * GPU_MERGE_COPIES * HEADROOM)
    if cpu_need > cpu_available:
        raise UserError(
            f"export: the fp32 model ({n_params / 1e9:.2f}B parameters, {weights / _GIB:.1f} GiB) needs about "
            f"{cpu_need / _GIB:.1f} GiB of free RAM to merge and export ({CPU_COPIES:g} copies + 10%), but only "
            f"{cpu_available / _GIB:.1f} GiB is free; run the export stage on a larger machine"
        )
    device, where = _merge_device(requested_device, gpu_need, gpu_available)
    reason = (
        f"fp32 weights {weights / _GIB:.2f} GiB; RAM need {cpu_need / _GIB:.2f} of "
        f"{cpu_available / _GIB:.2f} GiB free; {where}"
    )
    return {
        "n_params": int(n_params),
        "weights_bytes": int(weights),
        "cpu_need_bytes": cpu_need,
        "cpu_available_bytes": int(cpu_available),
        "gpu_need_bytes": gpu_need,
        "gpu_available_bytes": None if gpu_available is None else int(gpu_available),
        "merge_device": device,
        "reason": reason,
    }


def _merge_device(requested: str, gpu_need: int, gpu_available: int | None) -> tuple[str, str]:
    """("cuda" or "cpu", why): the GPU when one is allowed, present and large enough."""
    if requested not in ("auto", "cuda") or gpu_available is None:
        return "cpu", "merge on CPU"
    if gpu_need <= gpu_available:
        return "cuda", f"merge on GPU (need {gpu_need / _GIB:.2f} of {gpu_available / _GIB:.2f} GiB free)"
    return "cpu", f"merge on CPU: GPU has {gpu_available / _GIB:.2f} GiB free, needs {gpu_need / _GIB:.2f}"


# Bytes per parameter on disk: merged/ (fp32 safetensors) and onnx/ (fp32), and each variant's graph.
DISK_BYTES = {"merged": 4, "onnx": 4, "fp16": 2, "int8": 1}
DISK_EXTRA = 64 * 2**20  # tokenizers, model cards, layout files, ONNX external-data alignment


def export_disk_need(cfg: Config, base_src: str) -> int:
    """Bytes the export writes (its temporary directory at the peak), from the base's parameter count."""
    per_param = DISK_BYTES["merged"] + DISK_BYTES["onnx"] + sum(DISK_BYTES[v] for v in cfg.export.variants)
    return int(count_parameters(load_base_config(cfg, base_src)) * per_param * HEADROOM) + DISK_EXTRA


def count_parameters(config: Any) -> int:
    """Parameter count without loading weights: the architecture built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def cpu_available() -> int:
    """Free RAM in bytes."""
    import psutil

    return int(psutil.virtual_memory().available)


def gpu_available(requested: str) -> int | None:
    """Free memory of GPU 0 in bytes; None without a GPU or when `runtime.device` is cpu."""
    import torch

    if requested == "cpu" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)
