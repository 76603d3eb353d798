"""Idempotency and resume: the training's fingerprint, its finished summary, and its checkpoints.

* A training is identified by a fingerprint of everything that determines the adapter (params that
  change the result, the device setting, the split files' bytes, :data:`CODE_VERSION`).
* A finished training (summary + adapter with the same fingerprint) is reused, not redone.
* Trainer checkpoints every `train.save_steps` into run_dir/train/checkpoints. A re-run resumes from
  the newest *complete* checkpoint (Trainer writes trainer_state.json after weights, optimizer,
  scheduler and RNG state, so a checkpoint without it was cut short) and deletes half-written ones.
* A state file beside the checkpoints keeps what a resumed attempt needs and Trainer does not save:
  the fingerprint, the eval loss before training and the MLflow run id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from tasks.core.artifacts import read_json, write_json_atomic
from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.core.layout import RunLayout
from tasks.core.reuse import fingerprint, reusable

log = logging.getLogger("qa_lora.train")

# Bump when a change here changes what a training produces: older checkpoints/summaries are then
# not resumed or reused.
CODE_VERSION = "1"
STATE_FILE = "qa_lora_state.json"  # beside the checkpoints: fingerprint, eval loss before, MLflow run
CHECKPOINT_PREFIX = "checkpoint-"
# train.* keys that change neither the numbers nor the result: a re-run with new values still resumes.
NON_RESULT_KEYS = frozenset({"logging_steps", "save_steps", "save_total_limit"})


def training_fingerprint(cfg: Config, layout: RunLayout) -> str:
    """Hash of everything that determines the trained adapter: params and the split's bytes.

    Raises:
        UserError: a split file is missing (validate has not run for this run directory).
    """
    digests = {}
    for name, path in (("train", layout.train_split), ("eval", layout.eval_split)):
        if not path.is_file():
            raise UserError(f"{path}: split file not found; run `qa-lora validate` for this run first")
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    train = {k: v for k, v in cfg.train.model_dump().items() if k not in NON_RESULT_KEYS}
    blob = {
        "code": CODE_VERSION,
        "base": cfg.base.model_dump(mode="json"),
        "lora": cfg.lora.model_dump(mode="json"),
        "train": json.loads(json.dumps(train)),
        "device": cfg.runtime.device,
        "data": digests,
    }
    return fingerprint(blob)  # the split files are in `blob` by digest (the fingerprint of older runs)


def finished_summary(layout: RunLayout, expected: str) -> dict[str, Any] | None:
    """The summary of a finished training with fingerprint `expected` (adapter present), else None."""
    return reusable(
        layout.train_summary, expected, required=[layout.adapter_dir / "adapter_model.safetensors"]
    )


def prepare_output(layout: RunLayout, expected: str) -> None:
    """Keep checkpoints of this very training (resume); drop stale and half-written ones."""
    ckpt_dir = layout.checkpoints_dir
    state = read_state(ckpt_dir)
    if state and state.get("fingerprint") != expected:
        log.warning(
            "run_dir/train holds a training with other params or data (fingerprint %s, now %s): "
            "starting over instead of resuming it",
            state.get("fingerprint"),
            expected,
        )
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    elif not state and ckpt_dir.is_dir():
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # checkpoints of unknown origin: not resumable
    # A summary or adapter from other params must not outlive the training that replaces them.
    for stale in (layout.train_summary, layout.adapter_dir):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    remove_incomplete(ckpt_dir)
    if not state or state.get("fingerprint") != expected:
        write_json_atomic(ckpt_dir / STATE_FILE, {"fingerprint": expected})


def remove_incomplete(ckpt_dir: Path) -> None:
    """Delete half-written checkpoints (a process killed while saving): never resumed from, and a later
    save of the same step must not meet their files."""
    for path in checkpoints(ckpt_dir):
        if not is_complete(path):
            log.warning("removing half-written checkpoint %s (crashed while saving)", path.name)
            shutil.rmtree(path, ignore_errors=True)


def read_state(ckpt_dir: Path) -> dict[str, Any]:
    """The state file beside the checkpoints ({} when absent or unreadable)."""
    try:
        state = read_json(ckpt_dir / STATE_FILE)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def update_state(ckpt_dir: Path, **values: Any) -> None:
    """Merge `values` into the state file (atomically)."""
    write_json_atomic(ckpt_dir / STATE_FILE, {**read_state(ckpt_dir), **values})


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Trainer's checkpoint directories in `ckpt_dir`, oldest step first (complete or not)."""
    found = []
    for path in ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if path.is_dir() and suffix.isdigit():
            found.append(path)
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def is_complete(path: Path) -> bool:
    """Whether a checkpoint was written to the end.

    Trainer._save_checkpoint writes adapter, optimizer, scheduler, RNG state, then trainer_state.json.
    """
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    step = step_of(path)
    adapter = (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
    weights = adapter or _written(path, "pytorch_model_fsdp*")  # FSDP: sharded
    optimizer = _written(path, "optimizer*")
    return (
        state.get("global_step") == step
        and weights
        and optimizer
        and (path / "scheduler.pt").is_file()
        and any(path.glob("rng_state*.pth"))
    )


def _written(path: Path, pattern: str) -> bool:
    """A file matching `pattern` in `path`, or a sharded (torch.distributed.checkpoint) folder that is
    whole: its `.metadata` is written last, by rank 0, once every rank's shard is on disk."""
    return any(p.is_file() or (p / ".metadata").is_file() for p in path.glob(pattern))


def latest_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint in `ckpt_dir`, or None."""
    complete = [p for p in checkpoints(ckpt_dir) if is_complete(p)]
    return complete[-1] if complete else None


def step_of(checkpoint: Path | None) -> int | None:
    """The optimizer step a checkpoint directory was saved at (None for no checkpoint)."""
    return int(checkpoint.name[len(CHECKPOINT_PREFIX) :]) if checkpoint else None


def tokens_at(checkpoint: Path | None) -> int:
    """Non-pad tokens trained up to a checkpoint (0 for no checkpoint)."""
    if checkpoint is None:
        return 0
    return int(read_json(checkpoint / "trainer_state.json").get("num_input_tokens_seen", 0))
