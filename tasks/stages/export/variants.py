"""Optional fp16 / int8 variants of the exported graph, each checked against fp32 and recorded.

fp16: weights and compute in half, fp32 inputs/outputs. int8: dynamic weight quantization. Each lands in
onnx/<name>/ and is scored by teacher-forced top-1 agreement with fp32 on prompt + greedy answer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.plumbing.onnx_generate import OnnxGenerator
from tasks.plumbing.ort_runtime import ProviderChoice, import_onnxruntime
from tasks.stages.export.merge import ExportParityError
from tasks.stages.export.onnx_graph import ONNX_GRAPH, graph_size, quiet

log = logging.getLogger("qa_lora.export")


def export_variants(
    cfg: Config,
    onnx_dir: Path,
    choice: ProviderChoice,
    ids: Any,
    mask: Any,
    reference: Mapping[str, Any],
) -> dict[str, Any]:
    """Every variant of `export.variants`, converted and checked.

    Raises:
        ExportParityError: a variant's top-1 agreement is below `export.variant_min_top1`.
    """
    variants: dict[str, Any] = {}
    for name in cfg.export.variants:
        t = time.perf_counter()
        variants[name] = export_variant(name, onnx_dir, choice, ids, mask, reference, cfg)
        variants[name]["seconds"] = round(time.perf_counter() - t, 3)
        log.info(
            "export: variant %s: %s",
            name,
            json.dumps({k: v for k, v in variants[name].items() if k != "files"}),
        )
    failed = [n for n, v in variants.items() if not v["passed"]]
    if failed:
        detail = "; ".join(f"{n}: top-1 agreement {variants[n]['top1_agreement']:.4f}" for n in failed)
        raise ExportParityError(
            f"export.variants: {detail} < export.variant_min_top1={cfg.export.variant_min_top1}; "
            "drop the variant or lower the threshold"
        )
    return variants


def export_variant(
    name: str,
    onnx_dir: Path,
    choice: ProviderChoice,
    ids: Any,
    mask: Any,
    reference: Mapping[str, Any],
    cfg: Config,
) -> dict[str, Any]:
    """One variant in onnx/<name>/, checked against fp32 by teacher-forced top-1 agreement."""
    import numpy as np

    out = _convert(name, onnx_dir / ONNX_GRAPH, onnx_dir / name / ONNX_GRAPH)
    fp32 = OnnxGenerator(onnx_dir, provider=choice.name)
    variant = OnnxGenerator(
        onnx_dir, provider=choice.name, graph=f"{name}/{ONNX_GRAPH}", tokenizer=fp32.tokenizer
    )
    a, b, real = _teacher_forced_logits(fp32, variant, ids, mask, reference["token_ids"])
    agree = float((a.argmax(-1) == b.argmax(-1))[real].mean())
    greedy = variant.generate_ids(ids, mask, cfg.export.parity_new_tokens)
    same = sum(x == y for x, y in zip(greedy.token_ids, reference["token_ids"], strict=True))
    return {
        "path": f"onnx/{name}/{ONNX_GRAPH}",
        "provider": variant.provider,
        "top1_agreement": agree,
        "min_top1": cfg.export.variant_min_top1,
        "max_abs_diff": float(np.abs(a - b)[real].max()),
        "greedy_identical_rate": same / len(reference["token_ids"]),
        "size_bytes": graph_size(out),
        "passed": agree >= cfg.export.variant_min_top1,
    }


def _convert(name: str, src: Path, out: Path) -> Path:
    """Write the `name` variant of graph `src` to `out` (external data beside it)."""
    import onnx

    import_onnxruntime()  # its tools below; one clear line when no runtime (or two) is installed
    out.parent.mkdir(parents=True, exist_ok=True)
    if name == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with quiet():
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, use_external_data_format=True)
    elif name == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(out), save_as_external_data=True, location=f"{ONNX_GRAPH}.data")
        del model
    else:  # the config's Literal makes this unreachable; kept for a clear message if it grows
        raise UserError(f"export.variants: unknown variant {name!r}; expected fp16 or int8")
    return out


def _teacher_forced_logits(
    fp32: OnnxGenerator, variant: OnnxGenerator, ids: Any, mask: Any, answers: list[list[int]]
) -> tuple[Any, Any, Any]:
    """Logits of both graphs on the same sequences (prompt + fp32 greedy answer), and the real positions.

    Teacher forcing: both graphs score the same tokens, so one early disagreement does not cascade into
    every later position as free-running decoding would.
    """
    import numpy as np

    seqs = [
        [t for t, m in zip(row, mrow, strict=True) if m] + list(gen)
        for row, mrow, gen in zip(ids.tolist(), mask.tolist(), answers, strict=True)
    ]
    width = max(len(s) for s in seqs)
    full = np.array([[fp32.pad_token_id] * (width - len(s)) + s for s in seqs], dtype=np.int64)
    full_mask = np.array([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=np.int64)
    pos = np.maximum(np.cumsum(full_mask, axis=-1) - 1, 0) * full_mask
    a, _ = fp32.forward(full, full_mask, pos, fp32.empty_cache(len(seqs)))
    b, _ = variant.forward(full, full_mask, pos, variant.empty_cache(len(seqs)))
    return a, b, full_mask == 1
