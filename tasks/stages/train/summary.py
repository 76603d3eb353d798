"""The train summary (run_dir/train/train_summary.json), the loss table and the finished MLflow run.

The summary records what was decided and why (device plan with reasons, library translations), what
was trained (rows, tokens, steps, LoRA size) and how it went (losses before/after, throughput, peak
memory), so a run can be read without its log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from tasks.core.artifacts import write_json_atomic, write_text_atomic
from tasks.core.config import TrainConfig
from tasks.stages.train.checkpoints import step_of
from tasks.stages.train.reporting import finish_mlflow_run
from tasks.stages.train.session import Context, DeviceChoice, Fit, Inputs, Outcome

log = logging.getLogger("qa_lora.train")


def build_summary(
    ctx: Context, device: DeviceChoice, inputs: Inputs, fit: Fit, outcome: Outcome, started: float
) -> dict[str, Any]:
    """The train summary of this attempt (rank 0), see the module docstring."""
    cfg, t, plan, st = ctx.cfg, ctx.cfg.train, device.plan, fit.trainer.state
    history = loss_history(st.log_history)
    peak, peak_kind = peak_memory(plan.device)
    return {
        "fingerprint": ctx.fingerprint,
        "params_hash": cfg.params_hash(),
        "run_dir": str(ctx.layout.root),
        "adapter_dir": str(ctx.layout.adapter_dir),
        "device": _device_facts(device),
        "precision": plan.precision,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "attn_implementation": plan.attn_implementation,
        "plan": plan.to_dict(),
        "plan_reasons": list(plan.reasons),
        "precision_verdict": device.verdict.to_dict() if device.verdict else None,
        "kernels_verdict": device.kernels_verdict.to_dict() if device.kernels_verdict else None,
        "train_memory_estimate_bytes": device.estimate,
        "processes": ctx.world,
        "nodes": t.nnodes,
        "distributed": t.distributed if ctx.world > 1 else None,
        "worker_restarts": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "base": {"name_or_path": ctx.base.ref, "revision": cfg.base.revision, "kind": cfg.base.kind},
        "lora": cfg.lora.model_dump(mode="json"),
        "trainable_params": inputs.trainable,
        "total_params": inputs.total,
        "trainable_share": inputs.trainable / inputs.total,
        "train_rows": inputs.sft_rows,
        "replay_blocks": len(inputs.train_data) - inputs.sft_rows,  # general text against forgetting
        "eval_rows": len(inputs.eval_data),  # the in-training eval's bounded sample (eval.max_rows)
        "chat": inputs.chat.describe(),
        "data": fit.data_facts,
        "pad_token": inputs.tokenizer.pad_token,
        "pad_token_note": _pad_note(inputs.tokenizer),
        "steps": int(st.global_step),
        "max_steps": int(st.max_steps),
        "epochs": float(st.epoch or 0.0),
        "global_batch_size": _global_batch(t, ctx.world),
        **_throughput(fit, outcome, started),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "final_train_loss": history[-1]["loss"] if history else None,
        "mean_train_loss_this_attempt": float(outcome.output.training_loss),
        "eval_loss_before": outcome.eval_before,
        "eval_loss_after": outcome.eval_after,
        "loss_history": history,
        "resumed_from_step": step_of(fit.resume),
        "translations": _translations(t, ctx.world),
        "mlflow_run_id": fit.run_id,
        "library_versions": versions(),
    }


def write_outputs(ctx: Context, summary: dict[str, Any], run_id: str | None) -> None:
    """train_summary.json and loss.csv (atomically), then the MLflow run's final metrics and status."""
    layout = ctx.layout
    write_json_atomic(layout.train_summary, summary)
    # The loss curve as a table: `dvc plots show` draws it (train/loss.csv in dvc.yaml).
    rows = [f"{h['step']},{h['loss']:.6f},{h.get('learning_rate', 0.0):.6g}" for h in summary["loss_history"]]
    write_text_atomic(layout.loss_csv, "\n".join(["step,loss,learning_rate", *rows]) + "\n")
    if run_id:
        from tasks.plumbing.tracking import artifact_store_errors

        with artifact_store_errors(ctx.cfg.register.artifact_location):
            finish_mlflow_run(run_id, summary, layout.train_summary)
    log.info(
        "trained %d steps (%.2f epochs) in %.0fs: %.0f tokens/s, eval loss %s -> %.4f; adapter at %s",
        summary["steps"],
        summary["epochs"],
        summary["train_runtime_seconds"],
        summary["tokens_per_second"] or 0.0,
        summary["eval_loss_before"],
        summary["eval_loss_after"],
        layout.adapter_dir,
    )


def loss_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The logged training steps of Trainer's log history (evaluations left out)."""
    keys = ("step", "epoch", "loss", "learning_rate", "grad_norm")
    return [{k: h[k] for k in keys if k in h} for h in log_history if "loss" in h]


def peak_memory(device: str) -> tuple[int, str]:
    """Peak memory of this process in bytes, and what was measured."""
    import resource

    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process max RSS"


def versions() -> dict[str, str]:
    """Installed versions of the training libraries."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _device_facts(device: DeviceChoice) -> dict[str, Any]:
    import torch

    caps, plan = device.caps, device.plan
    return {
        "backend": caps.backend,
        "device": plan.device,
        "gpus": list(caps.gpu_names),
        "torch": caps.torch_version,
        "hip": caps.hip_version,
        "cuda": caps.cuda_version,
        "cpu_count": caps.cpu_count,
        "torch_threads": torch.get_num_threads() if plan.device == "cpu" else None,
    }


def _throughput(fit: Fit, outcome: Outcome, started: float) -> dict[str, Any]:
    """Tokens and seconds of this attempt: tokens/s over the optimizer steps only (not the evals)."""
    st = fit.trainer.state
    step_seconds = max(fit.reporter.t1 - fit.reporter.t0, 1e-9)  # the optimizer steps (and checkpoints)
    session_tokens = int(st.num_input_tokens_seen) - fit.tokens_at_resume
    return {
        "tokens_seen": int(st.num_input_tokens_seen),
        "tokens_seen_this_attempt": session_tokens,
        "tokens_per_second": session_tokens / step_seconds,
        "train_seconds": step_seconds,
        # includes the eval before training
        "train_runtime_seconds": float(outcome.output.metrics.get("train_runtime", 0.0)),
        "wall_seconds": time.perf_counter() - started,
    }


def _global_batch(t: TrainConfig, world: int) -> int:
    return t.per_device_train_batch_size * t.gradient_accumulation_steps * world


def _translations(t: TrainConfig, world: int) -> dict[str, str]:
    """How params that transformers 5 no longer reads as such were translated."""
    grouped = (
        f"seeded length-grouped sampler over global batches of {_global_batch(t, world)} (mega-batches of 50)"
        if t.group_by_length
        else "off: seeded random order"
    )
    return {
        "warmup_ratio": f"warmup_steps={t.warmup_ratio} (transformers 5 reads a float < 1 as a ratio)",
        "group_by_length": grouped,
        "max_steps": "epochs (num_train_epochs)" if t.max_steps == -1 else f"{t.max_steps} optimizer steps",
    }


def _pad_note(tokenizer: Any) -> str | None:
    """Why the pad token is what it is, when the loader's pad rule chose `unk` for it."""
    if tokenizer.unk_token is not None and tokenizer.pad_token_id == tokenizer.unk_token_id:
        return f"pad token is {tokenizer.unk_token!r} (the pad rule: pad must differ from EOS; unk used)"
    return None
