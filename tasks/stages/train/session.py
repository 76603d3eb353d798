"""What one training process carries from step to step (see process.py): plain records, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.core.layout import RunLayout
from tasks.plumbing.loading import BaseRef


@dataclass(frozen=True)
class Context:
    """The run this process trains for, and its place among the torchrun processes."""

    cfg: Config
    layout: RunLayout
    rank: int
    world: int
    fingerprint: str
    base: BaseRef
    info: dict[str, Any]  # model facts from model.inspect_base
    state: dict[str, Any]  # the checkpoint state file as found at the start

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs progress, tracks in MLflow and writes the outputs."""
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.layout.checkpoints_dir


@dataclass(frozen=True)
class DeviceChoice:
    """The machine's capabilities, the plan made from them, and the memory estimate behind it."""

    caps: Any  # tasks.plumbing.device.DeviceCaps
    plan: Any  # tasks.plumbing.device.DevicePlan
    estimate: int
    verdict: Any = None  # tasks.plumbing.verdicts.Verdict of `precision: auto`; None when not measured
    kernels_verdict: Any = None  # the Verdict of `kernels: auto` (GPUs); None when not measured


@dataclass(frozen=True)
class Inputs:
    """Tokenizer and chat format, the tokenized splits (memory-mapped datasets) and the LoRA-wrapped model."""

    tokenizer: Any
    chat: Any  # tasks.plumbing.chat.ChatFormat
    train_data: Any  # datasets.Dataset of input_ids, labels
    eval_data: Any  # the bounded eval sample, the same columns
    model: Any
    trainable: int
    total: int
    sft_rows: int  # train_data's first rows; replay blocks of general text follow (train.replay_ratio)


@dataclass(frozen=True)
class Fit:
    """A Trainer ready to run: its args, progress reporter, resume point and MLflow run."""

    trainer: Any
    args: Any
    reporter: Any
    resume: Path | None
    run_id: str | None
    data_facts: dict[str, Any]
    eval_before: float | None  # from an earlier attempt's state file, if it measured it
    tokens_at_resume: int


@dataclass(frozen=True)
class Outcome:
    """What `Trainer.train` and the eval after it returned."""

    output: Any  # transformers TrainOutput
    eval_before: float | None
    eval_after: float
