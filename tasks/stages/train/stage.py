"""`qa-lora train`: LoRA SFT of the base model on the validated train split (TRL SFTTrainer + PEFT).

Readable top to bottom: idempotency check -> base model and bad-parameter checks (before any step)
-> one training process here, or N through torchrun -> adapter + summary. The parts live beside this
module:

* checkpoints.py: fingerprint, reuse of a finished training, resume from the newest complete checkpoint;
* model.py: checks of the params against the model (meta device), loading, the LoRA config;
* process.py: one training process as named steps (plan, load, build trainer, fit, save, summarise);
* data.py, trainer.py, reporting.py: what those steps use;
* distributed.py: N processes through torchrun (worker entry: tasks/runners/launch.py).

Outputs (atomic, paths from RunLayout): run_dir/train/adapter/ (adapter weights + config + tokenizer),
run_dir/train/train_summary.json and loss.csv; one MLflow run per training (reused across resumes).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.core.layout import RunLayout
from tasks.plumbing.loading import BaseRef, resolve_base
from tasks.stages.train.checkpoints import finished_summary, prepare_output, training_fingerprint
from tasks.stages.train.distributed import launch_processes
from tasks.stages.train.model import inspect_base
from tasks.stages.train.probe import kernels_verdict, precision_verdict
from tasks.stages.train.process import train_process

log = logging.getLogger("qa_lora.train")


def train_adapter(cfg: Config, run_dir: Path, *, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on run_dir/data/train.jsonl and write it to run_dir/train/.

    Args:
        cfg: the pipeline configuration (reads `base`, `lora`, `train`, `register`, `runtime`).
        run_dir: this run's directory; reads data/train.jsonl and data/eval.jsonl.
        callbacks: extra transformers TrainerCallbacks added to the Trainer (e.g. a benchmark's step
            timer); only with one process (`train.num_processes: 1`): they cannot cross into workers.

    Returns:
        A small dict: adapter and summary paths, steps, losses, tokens/s, MLflow run id, and whether
        this call trained, resumed or found the training already finished.

    Raises:
        UserError: missing split files, a base model that is missing or has no safetensors, or bad
            params (unknown LoRA target module, max_length above the model's limit, ...), all
            detected before any training step.
        ValueError: `callbacks` given with more than one training process.
    """
    started = time.perf_counter()
    if callbacks and (cfg.train.num_processes > 1 or cfg.train.nnodes > 1):
        raise ValueError("train_adapter: callbacks need train.num_processes == 1 (they stay in this process)")
    layout = RunLayout.of(run_dir)
    fingerprint = training_fingerprint(cfg, layout)
    finished = finished_summary(layout, fingerprint)
    if finished is not None:
        log.info("training already finished for this run and params (%s): reusing it", layout.train_summary)
        return _result(finished, layout, status="reused")

    base = _base_model(cfg)
    info = inspect_base(cfg, base)
    with _nodes_in_turn(cfg, layout):  # every node runs this stage on the shared run directory
        prepare_output(layout, fingerprint)
    summary = _train(cfg, layout, base, info, started, callbacks)
    return _result(summary, layout, status="resumed" if summary.get("resumed_from_step") else "trained")


def _base_model(cfg: Config) -> BaseRef:
    """The base to train on; the embedded tiny base is built first (cached after the first build)."""
    if cfg.base.kind == "tiny":
        from tasks.plumbing.base import build_base_model

        build_base_model(cfg)
    return resolve_base(cfg)


def _train(
    cfg: Config,
    layout: RunLayout,
    base: BaseRef,
    info: dict[str, Any],
    started: float,
    callbacks: Sequence[Any],
) -> dict[str, Any]:
    """One process here, or N through torchrun; returns rank 0's summary."""
    if cfg.train.num_processes > 1 or cfg.train.nnodes > 1:
        _measure_once(cfg, layout, base, info)
        launch_processes(cfg, layout)
        return _rank0_summary(layout, training_fingerprint(cfg, layout))
    import torch

    threads = torch.get_num_threads()
    try:
        summary = train_process(cfg, layout.root, base=base, info=info, started=started, callbacks=callbacks)
    finally:
        torch.set_num_threads(threads)  # runtime.num_threads must not outlive the stage in this process
    assert summary is not None  # the single process is rank 0
    return summary


def _rank0_summary(layout: RunLayout, fingerprint: str, timeout_s: float = 600) -> dict[str, Any]:
    """The summary global rank 0 writes: on another node the workers may end first, so wait for it.

    Raises:
        RuntimeError: none with this training's fingerprint appeared within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        summary = finished_summary(layout, fingerprint)
        if summary is not None:
            return summary
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{layout.train_summary}: rank 0 wrote no summary of this training within {timeout_s} s"
            )
        time.sleep(1)


def _measure_once(cfg: Config, layout: RunLayout, base: BaseRef, info: dict[str, Any]) -> None:
    """Measure `precision: auto` and `kernels: auto` here, before torchrun: the workers then read the
    cached verdicts, so every rank trains alike and the measurement is not run N times at once."""
    from tasks.plumbing.device import detect_capabilities, plan_device

    caps = detect_capabilities(cfg.runtime.device)
    verdict = precision_verdict(cfg, layout, base, info, caps)
    precision = plan_device(caps, verdict.choice if verdict else cfg.train.precision).precision
    kernels_verdict(cfg, layout, base, info, caps, precision)


@contextlib.contextmanager
def _nodes_in_turn(cfg: Config, layout: RunLayout) -> Iterator[None]:
    """With several nodes, one at a time (a lock on the shared run directory): no node can remove
    checkpoints another is about to resume from. Training starts only once every node has rendezvoused,
    so no checkpoint is being written meanwhile."""
    if cfg.train.nnodes == 1:
        yield
        return
    from filelock import FileLock

    layout.train_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(layout.train_dir / ".prepare.lock")):
        yield


def _result(summary: dict[str, Any], layout: RunLayout, status: str) -> dict[str, Any]:
    return {
        "status": status,
        "adapter_dir": str(layout.adapter_dir),
        "summary": str(layout.train_summary),
        "steps": summary.get("steps"),
        "final_train_loss": summary.get("final_train_loss"),
        "eval_loss_before": summary.get("eval_loss_before"),
        "eval_loss_after": summary.get("eval_loss_after"),
        "tokens_per_second": summary.get("tokens_per_second"),
        "mlflow_run_id": summary.get("mlflow_run_id"),
        "resumed_from_step": summary.get("resumed_from_step"),
    }
