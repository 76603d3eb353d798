"""Progress and tracking: log lines per logged step, one MLflow run per training (reused across resumes).

The progress reporter is a Trainer callback: it logs step, loss, tokens/s and ETA, sends per-step
metrics to MLflow, times the optimizer steps (the eval before training excluded), and saves the eval
loss before training to the state file at once, so a resumed attempt still reports it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.stages.train.checkpoints import read_state, update_state

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
