"""Figure 7 (`--device cuda`, also ROCm): LoRA tokens/s per GPU and MFU on a >= 1B Llama in bf16.

Unattended, about 3 minutes on one GPU (about 45 GB of GPU memory at peak, 4 GB of disk):

1. A Llama-architecture model (TinyLlama's shape: 22 layers, hidden 2048, GQA 32/4 heads, vocab
   32000; 1.1B parameters) with random weights built from its config on the GPU, saved in bf16 with
   the tiny base's tokenizer (its ids are a subset of the vocabulary). No download.
2. A synthetic Q&A split with ~490-token rows (the shipped answers, concatenated, cut at 512) so
   that the GEMMs are GPU-sized.
3. The train stage unchanged (`runtime.device=cuda`; its device plan picks bf16, SDPA/flash attention
   and no gradient checkpointing when memory allows), each step paired with a bare PyTorch + PEFT step
   on the same batch; its rate over the steps on already-seen shapes (steady state); then the naive
   port on TRL defaults (bf16 + gradient checkpointing + padding); the bare loop at other batch sizes;
   a profiler split of a bare step's kernel time (GEMM, attention, the rest).
4. torch.matmul bf16 FLOP/s on 4096^2 and 8192^2 matrices, in the same run: MFU = useful training
   FLOP/s (4*N_frozen + 6*N_lora + 12*L*d*T per token) / that.
5. A real training check: the train and evaluate stages on the bundled data and the tiny base, in
   bf16 and in fp32 on the GPU (eval loss and F1 should agree).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import bench_config, gemm_flops, loadavg, ratio

LLAMA_1B = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


class NotMeasured(RuntimeError):
    """No GPU here: the figure is reported as not measured, never as a number."""


def run(tmp: Path, quick: bool, device: str, shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """Figure 7 on a GPU; raises NotMeasured anywhere else (a CPU number would answer nothing)."""
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        raise NotMeasured("no GPU on this machine (run `python -m benchmarks.run --device cuda` on one)")
    return measure(tmp, quick, device, shape or LLAMA_1B)


def measure(
    tmp: Path,
    quick: bool,
    device: str,
    shape: dict[str, Any],
    batch: int = 16,
    variant_batches: tuple[int, ...] = (8, 16, 32),
    tiny_check: bool = True,
) -> dict[str, Any]:
    """Build the model and data, run the stage, the bare loop and TRL defaults, measure GEMMs.

    `device="cpu"` with a small `shape` runs the same code end to end (a smoke test of this script
    before it is spent on a GPU lease); its numbers mean nothing.
    """
    import torch

    from benchmarks import mfu, training
    from benchmarks.common import machine

    gpu = device == "cuda"
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    warmup, steps, blocks = (3, 12, 3) if quick else (5, 30, 3)
    naive_steps = 6 if quick else 15
    cfg, run_dir, build_s = _prepare(tmp, shape, device, warmup + steps, batch)
    dtype = "bfloat16" if gpu else "float32"
    gemm = gemm_flops(device, dtype, [4096, 8192] if gpu else [256, 512], seconds=2.0 if gpu else 0.3)
    stage = training.measure_stage(cfg, run_dir, warmup, blocks, attn="sdpa")
    batches = stage.pop("batches")
    naive = training.measure_naive(cfg, run_dir, batch, batches, "sdpa", 2, naive_steps, blocks)
    flops = mfu.flops_per_token(cfg, stage["trainer"]["mean_seq_len"])
    best = max(g["flops"] for g in gemm.values())
    variants = _variants(cfg, batches, variant_batches, quick)
    for v in variants:
        if "tokens_per_s" in v:
            v["mfu"] = ratio(v["tokens_per_s"] * flops["lora"], best)
    steady = steady_state(batches, stage["trainer_step_s"], stage["bare_step_s"], warmup)
    rate = steady["trainer_tokens_per_s"]
    steady["mfu"] = ratio(rate * flops["lora"], best) if rate else None
    return {
        "machine": machine(),
        "started": started,
        "gpu": torch.cuda.get_device_name(0) if gpu else "none (CPU smoke run)",
        "hip": torch.version.hip,
        "cuda": torch.version.cuda,
        "model": {**shape, "params": flops["N_params"]},
        "batch_size": batch,
        "build_s": round(build_s, 1),
        "gemm": {"dtype": dtype, **gemm},
        "flops_per_token": flops,
        **_rates(stage, naive, flops, best),
        "stage": stage,
        "naive": naive,
        "variants": variants,
        "steady_state": steady,
        "kernel_time": _guarded(_profile_bare, cfg, batches),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if gpu else None,
        "tiny_check": _guarded(_tiny_check, tmp, device, quick) if tiny_check else None,
        "load": loadavg(),
    }


def _prepare(
    tmp: Path, shape: dict[str, Any], device: str, max_steps: int, batch: int
) -> tuple[Any, Path, float]:
    """The random model of `shape`, a split long enough for every step, the config: (cfg, run dir, build s)."""
    t = time.perf_counter()
    model_dir = _build_model(tmp / "llama-1b", shape, device)
    build_s = time.perf_counter() - t
    run_dir = tmp / "runs" / "gpu-bench"
    _write_long_split(run_dir, rows=max_steps * batch * 2)
    cfg = bench_config(
        tmp,
        [
            ("base.name_or_path", str(model_dir)),
            ("base.kind", "hub"),
            ("runtime.device", device),
            ("train.max_steps", max_steps),
            ("train.per_device_train_batch_size", batch),
            ("train.max_length", 512),
            ("train.save_steps", 10_000),
            ("train.logging_steps", 10),
            ("train.learning_rate", 1e-4),
            ("lora.r", 16),
            ("lora.alpha", 32),
            ("train.replay_ratio", 0.0),  # a random model has no pretraining text to replay
        ],
    )
    return cfg, run_dir, build_s


def _rates(
    stage: dict[str, Any], naive: dict[str, Any], flops: dict[str, Any], best: float
) -> dict[str, Any]:
    """Tokens/s of the stage, the bare loop and TRL defaults, their ratios, and MFU against `best`."""
    s_rate, s_probe = stage["trainer"]["tokens_per_s"], stage["paired_bare"]["tokens_per_s"]
    n_rate = naive["trainer"]["tokens_per_s"]
    return {
        "stage_tokens_per_s": s_rate,
        "bare_tokens_per_s": s_probe,
        "naive_tokens_per_s": n_rate,
        "stage_vs_bare": stage["relative_to_bare"]["median"],
        "stage_vs_naive": ratio(stage["relative_to_bare"]["median"], naive["relative_to_bare"]["median"]),
        "stage_vs_naive_raw": ratio(s_rate, n_rate),
        "stage_mfu": ratio(s_rate * flops["lora"], best),
        "stage_mfu_6n": ratio(s_rate * flops["six_n"], best),
        "bare_mfu": ratio(s_probe * flops["lora"], best),
        "naive_mfu": ratio(n_rate * flops["lora"], best),
    }


def _variants(
    cfg: Any, batches: list[dict[str, Any]], sizes: tuple[int, ...], quick: bool
) -> list[dict[str, Any]]:
    """The bare loop over the stage's sequences, length-grouped, at several batch sizes.

    What batching alone does to tokens/s on this GPU (the stage's batch is one of them). A size that
    does not fit in memory is reported as such, not skipped silently.
    """
    import torch

    from benchmarks import mfu

    on_gpu = cfg.runtime.device == "cuda"
    out = []
    for size in sizes:
        try:
            rows = mfu.batch_variants(
                cfg,
                batches,
                "sdpa",
                quick,
                variants=((f"length-grouped, batch {size}", size, True),),
                warm_all=on_gpu,
            )
            out.extend(rows)
        except Exception as exc:  # out of memory above all: report it, keep the other sizes
            error = f"{type(exc).__name__}: {exc}"[:300]
            out.append({"variant": f"length-grouped, batch {size}", "batch": size, "error": error})
        finally:
            if on_gpu:
                torch.cuda.empty_cache()
    return out


def steady_state(
    batches: list[dict[str, Any]], trainer_s: list[float], bare_s: list[float], warmup: int
) -> dict[str, Any]:
    """The measured steps whose batch shape the process had already run.

    A GPU pays once per new (batch, length) shape (cuDNN attention plans, GEMM heuristics): on the
    H100 a step with a new shape took about twice as long. The trainer always meets a shape first
    (its bare twin runs right after, warm), so short runs charge that one-off cost to the stage. Over
    a real run (every length seen in the first epoch) it amortises; this is the rate after it.
    """
    seen: set[tuple[int, ...]] = set()
    toks = trainer_t = bare_t = 0.0
    kept = 0
    for i, (b, t, u) in enumerate(zip(batches, trainer_s, bare_s, strict=True)):
        shape = tuple(b["input_ids"].shape)
        if i >= warmup and shape in seen:
            toks += int(b["attention_mask"].sum())
            trainer_t += t
            bare_t += u
            kept += 1
        seen.add(shape)
    return {
        "steps": kept,
        "trainer_tokens_per_s": toks / trainer_t if trainer_t else None,
        "bare_tokens_per_s": toks / bare_t if bare_t else None,
        "stage_vs_bare": ratio(bare_t, trainer_t),
    }


def _profile_bare(cfg: Any, batches: list[dict[str, Any]], steps: int = 3) -> dict[str, Any]:
    """GPU kernel time of bare steps by kind (GEMM, attention, the rest): what limits the MFU.

    On a CPU (the smoke run) the same split is made of operator self times.
    """
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import training

    gpu = cfg.runtime.device == "cuda"

    bare = training.Bare(cfg, "sdpa")
    for b in batches[:2]:
        bare.step(b)  # warm: shapes, allocator
    chosen = batches[2 : 2 + steps]
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]
    with profile(activities=activities) as prof:
        wall = sum(bare.step(b) for b in chosen)
    kinds: dict[str, float] = {}
    for e in prof.key_averages():
        own = e.self_device_time_total if gpu else e.self_cpu_time_total
        if e.device_type.name != ("CUDA" if gpu else "CPU") or not own:
            continue  # on a GPU, kernels only: operator rows would count the same time twice
        name = e.key.lower()
        if any(k in name for k in ("sdpa", "fmha", "flash", "attention", "attn")):
            kind = "attention"
        elif any(k in name for k in ("gemm", "nvjet", "cutlass", "xmma", "cijk_", "aten::mm", "aten::addmm")):
            kind = "gemm"
        else:
            kind = "elementwise, norms, casts, loss, optimizer"
        kinds[kind] = kinds.get(kind, 0.0) + own / 1e6  # us -> s
    busy = sum(kinds.values())
    return {
        "steps": len(chosen),
        "wall_s_per_step": wall / len(chosen),
        "gpu_busy_s_per_step": busy / len(chosen),
        "share": {k: round(v / busy, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
    }


def _guarded(fn: Any, *args: Any) -> Any:
    """A failing side check is recorded with its trace; the figure's numbers are kept."""
    import traceback

    try:
        return fn(*args)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}


def _tiny_check(tmp: Path, device: str, quick: bool) -> dict[str, Any]:
    """The train and evaluate stages on the bundled data and the tiny base, in bf16 and in fp32.

    A real training check of the GPU path (the device plan, bf16 autocast, the evaluate stage's
    generation on the GPU): the two precisions should land on about the same eval loss and F1.
    """
    from benchmarks.common import write_split
    from tasks.stages.evaluate import evaluate_against
    from tasks.stages.train import train_adapter

    out: dict[str, Any] = {}
    for precision in ("bf16", "fp32"):
        run_dir = tmp / "runs" / f"tiny-{precision}"
        write_split(run_dir, max_eval=64)
        overrides: list[tuple[str, Any]] = [
            ("runtime.device", device),
            ("train.precision", precision),
            ("train.save_steps", 10_000),
        ]
        if quick or device != "cuda":
            overrides += [("train.max_steps", 20), ("eval.max_rows", 16), ("eval.max_new_tokens", 16)]
        cfg = bench_config(tmp / precision, overrides)
        t = time.perf_counter()
        train = train_adapter(cfg, run_dir)
        train_s = time.perf_counter() - t
        summary = json.loads(Path(train["summary"]).read_text())
        t = time.perf_counter()
        gate = evaluate_against(cfg, run_dir, champion=None)  # no registry on the GPU machine
        out[precision] = {
            "precision_used": summary.get("precision"),
            "steps": summary.get("steps"),
            "train_s": round(train_s, 1),
            "tokens_per_s": summary.get("tokens_per_second"),
            "eval_loss_before": summary.get("eval_loss_before"),
            "eval_loss_after": summary.get("eval_loss_after"),
            "evaluate_s": round(time.perf_counter() - t, 1),
            "gate_passed": gate["passed"],
            "candidate": gate["candidate"],
            "base": gate["base"],
        }
    return out


def _build_model(out: Path, shape: dict[str, Any], device: str) -> Path:
    """Random weights from a config, saved in bf16 with the tiny base's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.core.config import REPO_ROOT

    tok = AutoTokenizer.from_pretrained(str(REPO_ROOT / "models" / "tiny-base"))
    config = LlamaConfig(
        **shape,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def _write_long_split(run_dir: Path, rows: int) -> None:
    """Q&A rows with ~400-token answers: shipped answers concatenated (GPU-sized sequences)."""
    from tasks.core.config import REPO_ROOT

    source = [json.loads(line) for line in (REPO_ROOT / "data" / "qa.jsonl").read_text().splitlines() if line]
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, n, offset in (("train", rows, 0), ("eval", 32, rows)):
        lines = []
        for i in range(n):
            q = source[(offset + i) % len(source)]
            answer = " ".join(source[(offset + i + k) % len(source)]["answer"] for k in range(30))
            lines.append(
                json.dumps(
                    {"id": f"{name}{i}", "question": q["question"], "answer": answer[:3600], "category": "x"}
                )
            )
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
