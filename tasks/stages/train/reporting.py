"""What a training reports: progress while it runs, one MLflow run per training (reused across resumes),
and the summary when it ends (run_dir/train/train_summary.json, the loss table, the finished MLflow run).

The progress reporter is a Trainer callback: it logs step, loss, tokens/s and ETA, sends per-step
metrics to MLflow, times the optimizer steps (the eval before training excluded), and saves the eval
loss before training to the state file at once, so a resumed attempt still reports it. The summary
records what was decided and why (device plan with reasons, library translations), what was trained
(rows, tokens, steps, LoRA size) and how it went (losses before/after, throughput, peak memory), so a
run can be read without its log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from tasks.core.artifacts import write_json_atomic, write_text_atomic
from tasks.core.config import Config, TrainConfig
from tasks.stages.train.checkpoints import read_state, step_of, update_state
from tasks.stages.train.session import Context, DeviceChoice, Fit, Inputs, Outcome

log = logging.getLogger("qa_lora.train")


class ProgressReporter:
    """The reporter's behaviour; :func:`make_reporter` mixes it into a transformers TrainerCallback.

    Attributes read after training: `t0`/`t1` (start and end of the optimizer steps, perf_counter
    seconds) and `eval_losses` (every evaluation's loss, the eval before training first).
    """

    def __init__(self, run_id: str | None, ckpt_dir: Path, main: bool) -> None:
        self.run_id = run_id
        self.ckpt_dir = ckpt_dir
        self.main = main
        self.t0 = 0.0
        self.t1 = 0.0
        self.step0 = 0
        self.last: tuple[float, int] = (0.0, 0)
        self.eval_losses: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.t0 = time.perf_counter()
        self.step0 = state.global_step
        self.last = (self.t0, state.num_input_tokens_seen)
        if self.main:
            log.info("training: step %d of %d", state.global_step, state.max_steps)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        loss = float((metrics or {}).get("eval_loss", float("nan")))
        self.eval_losses.append(loss)
        first_before_training = len(self.eval_losses) == 1 and args.eval_on_start
        if first_before_training and state.global_step == self.step0:
            # the steps start now: the eval before training is not training throughput
            self.t0 = time.perf_counter()
            self.last = (self.t0, state.num_input_tokens_seen)
        if self.main and first_before_training:
            update_state(self.ckpt_dir, eval_loss_before=loss)
            log.info("eval loss before training: %.4f", loss)
            if self.run_id:
                mlflow_metrics(self.run_id, {"eval_loss": loss}, state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.t1 = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not self.main or not logs or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        tps = (tokens - self.last[1]) / max(now - self.last[0], 1e-9)
        self.last = (now, tokens)
        done = state.global_step - self.step0
        elapsed = now - self.t0
        eta = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
        log.info(
            "step %d/%d epoch %.2f loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f elapsed %.0fs eta %.0fs",
            state.global_step,
            state.max_steps,
            state.epoch or 0.0,
            logs["loss"],
            logs.get("learning_rate", float("nan")),
            logs.get("grad_norm", float("nan")),
            tps,
            elapsed,
            eta,
        )
        if self.run_id is None:
            return
        values = {
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_second": tps,
            "tokens_seen": tokens,
            "epoch": state.epoch,
            "mean_token_accuracy": logs.get("mean_token_accuracy"),
        }
        mlflow_metrics(self.run_id, values, state.global_step)


def make_reporter(run_id: str | None, ckpt_dir: Path, main: bool) -> Any:
    """A TrainerCallback with :class:`ProgressReporter`'s behaviour (transformers imported here, late)."""
    from transformers import TrainerCallback

    reporter_class = type("Reporter", (ProgressReporter, TrainerCallback), {})
    return reporter_class(run_id, ckpt_dir, main)


def mlflow_metrics(run_id: str, values: dict[str, Any], step: int) -> None:
    """Log the numeric, non-NaN entries of `values` at `step` in one batch."""
    import mlflow
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), stamp, step)
        for key, value in values.items()
        if isinstance(value, (int, float)) and value == value  # drop None and NaN
    ]
    if metrics:
        mlflow.MlflowClient().log_batch(run_id, metrics=metrics)


def mlflow_params(cfg: Config, plan: Any, caps: Any, counts: dict[str, Any]) -> dict[str, Any]:
    """The run's params: every scalar of base/lora/train, the device and plan, and `counts`
    (processes, trainable and total parameters, rows, the chat format)."""
    params: dict[str, Any] = {}
    for section in ("base", "lora", "train"):
        for key, value in getattr(cfg, section).model_dump(mode="json").items():
            if not isinstance(value, dict):
                params[f"{section}.{key}"] = value
    params.update(
        {
            "device.backend": caps.backend,
            "device.gpus": ",".join(caps.gpu_names) or "none",
            "device.cpu_count": caps.cpu_count,
            "device.torch": caps.torch_version,
            "plan.precision": plan.precision,
            "plan.gradient_checkpointing": plan.gradient_checkpointing,
            "plan.attn_implementation": plan.attn_implementation,
            **counts,
        }
    )
    return params


def start_mlflow_run(cfg: Config, run_dir: Path, ckpt_dir: Path, params: dict[str, Any]) -> str:
    """One MLflow run per training: created once, reopened by a resumed attempt. Returns its id."""
    import mlflow
    from mlflow.entities import Param

    from tasks.plumbing.tracking import setup_mlflow

    experiment_id = setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    run_id = read_state(ckpt_dir).get("mlflow_run_id")
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
            log.info("MLflow: continuing run %s", run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            log.warning(
                "MLflow run %s not found in %s: starting a new one", run_id, cfg.register.tracking_uri
            )
    tags = {
        "qa_lora.stage": "train",
        "qa_lora.run_dir": str(run_dir),
        "qa_lora.params_hash": cfg.params_hash(),
    }
    run_id = client.create_run(experiment_id, run_name=f"train-{run_dir.name}", tags=tags).info.run_id
    flat = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(flat), 100):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=flat[start : start + 100])
    update_state(ckpt_dir, mlflow_run_id=run_id)
    log.info(
        "MLflow: run %s in experiment %r (%s)", run_id, cfg.register.experiment, cfg.register.tracking_uri
    )
    return run_id


def fail_mlflow_run(run_id: str | None) -> None:
    """Mark the run FAILED (a training that raised); no-op without a run."""
    if run_id:
        import mlflow

        mlflow.MlflowClient().set_terminated(run_id, status="FAILED")


def finish_mlflow_run(run_id: str, summary: dict[str, Any], summary_path: Path) -> None:
    """Final metrics, the summary as an artifact, status FINISHED."""
    import mlflow

    client = mlflow.MlflowClient()
    final = {
        "eval_loss": summary["eval_loss_after"],
        "final_train_loss": summary["final_train_loss"],
        "train_tokens_per_second": summary["tokens_per_second"],
        "train_seconds": summary["train_seconds"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "trainable_share": summary["trainable_share"],
    }
    mlflow_metrics(run_id, final, summary["steps"])
    client.log_artifact(run_id, str(summary_path))
    client.set_terminated(run_id, status="FINISHED")


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
        "params_held_by_rank0": held_params(fit.trainer.model),  # its shards under FSDP
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


def held_params(model: Any) -> int:
    """Parameters in this process's memory: under FSDP its shards (the local part of each DTensor)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


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
