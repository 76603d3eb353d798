"""`qa-lora train`: LoRA SFT of the base model on the validated train split (TRL SFTTrainer + PEFT).

Readable top to bottom: idempotency check -> base model and bad-parameter checks (before any step)
-> single process here, or N processes through torchrun (tasks/launch.py) -> in each process: device
plan, tokenizer, prompt/completion datasets, base + LoRA, SFTConfig set explicitly from the plan,
resume from the latest complete checkpoint, eval before, train, eval after -> adapter + summary.

* Data: run_dir/data/{train,eval}.jsonl rows become prompt/completion pairs rendered by
  tasks/prompting.py. TRL then masks the prompt (completion_only_loss) and the completion ends with
  EOS, so the model learns to stop; padding uses a separate pad token, never EOS. The first collated
  batch is inspected before training to prove both.
* Device: tasks/device.py decides precision, gradient checkpointing and attention from the machine's
  capabilities; every SFTConfig field that TRL would otherwise default (bf16 + gradient checkpointing)
  is set from that plan. The plan and its reasons go to the log and into train_summary.json.
* Library translations (transformers 5): `train.warmup_ratio` -> `warmup_steps` as a float ratio;
  `train.group_by_length` -> a seeded length-grouped sampler over *global* batches (so N processes
  see the same samples per optimizer step as one process); `max_steps: -1` -> epochs.
* Resume: Trainer checkpoints every `train.save_steps` into run_dir/train/checkpoints. A re-run
  resumes from the newest *complete* checkpoint (Trainer writes trainer_state.json after weights,
  optimizer, scheduler and RNG state, so a checkpoint without it was cut short) and deletes
  half-written ones. A finished run re-run returns its summary without training (idempotent).
* Outputs (atomic): run_dir/train/adapter/ (adapter weights + config + tokenizer) and
  run_dir/train/train_summary.json; one MLflow run per training (reused across resumes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir, read_json, write_json_atomic, write_text_atomic
from tasks.core.config import Config, LoraSection
from tasks.core.errors import UserError
from tasks.plumbing.dataio import read_split
from tasks.plumbing.prompting import format_completion, format_prompt

log = logging.getLogger("qa_lora.train")

# Bump when a change here changes what a training produces: older checkpoints/summaries are then
# not resumed or reused.
CODE_VERSION = "1"
SUMMARY_FILE = "train_summary.json"
STATE_FILE = "qa_lora_state.json"  # beside the checkpoints: fingerprint, eval loss before, MLflow run
CHECKPOINT_PREFIX = "checkpoint-"
# train.* keys that change neither the numbers nor the result: a re-run with new values still resumes.
_NON_RESULT_KEYS = frozenset({"logging_steps", "save_steps", "save_total_limit"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def train_adapter(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on run_dir/data/train.jsonl and write it to run_dir/train/.

    Args:
        cfg: the pipeline configuration (reads `base`, `lora`, `train`, `register`, `runtime`).
        run_dir: this run's directory; reads data/train.jsonl and data/eval.jsonl.

    Returns:
        A small dict: adapter and summary paths, steps, losses, tokens/s, MLflow run id, and whether
        this call trained, resumed or found the training already finished.

    Raises:
        UserError: missing split files, a base model that is missing or has no safetensors, or bad
            params (unknown LoRA target module, max_length above the model's limit, ...), all
            detected before any training step.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    out = run_dir / "train"
    fingerprint = _fingerprint(cfg, run_dir)

    finished = _finished_summary(out, fingerprint)
    if finished is not None:
        log.info("training already finished for this run and params (%s): reusing it", out / SUMMARY_FILE)
        return _result(finished, out, status="reused")

    base = _resolve_base(cfg, build=True)
    info = _inspect_base(cfg, base)
    _prepare_output(out, fingerprint)

    if cfg.train.num_processes > 1:
        from tasks.runners.launch import launch_training

        launch_training(cfg, run_dir)
        summary = read_json(out / SUMMARY_FILE)
    else:
        import torch

        threads = torch.get_num_threads()
        try:
            summary = _train_process(cfg, run_dir, base=base, info=info, started=started)
        finally:
            torch.set_num_threads(threads)  # runtime.num_threads must not outlive the stage in this process
    assert summary is not None  # the single process is rank 0
    return _result(summary, out, status="resumed" if summary.get("resumed_from_step") else "trained")


# ------------------------------------------------------------------------------------ idempotency


def _fingerprint(cfg: Config, run_dir: Path) -> str:
    """Hash of everything that determines the trained adapter: params and the split's bytes."""
    paths = _split_paths(run_dir)
    digests = {}
    for name, path in paths.items():
        if not path.is_file():
            raise UserError(f"{path}: split file not found; run `qa-lora validate` for this run first")
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    train = {k: v for k, v in cfg.train.model_dump().items() if k not in _NON_RESULT_KEYS}
    blob = {
        "code": CODE_VERSION,
        "base": cfg.base.model_dump(mode="json"),
        "lora": cfg.lora.model_dump(mode="json"),
        "train": json.loads(json.dumps(train)),
        "device": cfg.runtime.device,
        "data": digests,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _split_paths(run_dir: Path) -> dict[str, Path]:
    return {"train": run_dir / "data" / "train.jsonl", "eval": run_dir / "data" / "eval.jsonl"}


def _finished_summary(out: Path, fingerprint: str) -> dict[str, Any] | None:
    path = out / SUMMARY_FILE
    if not path.is_file() or not (out / "adapter" / "adapter_model.safetensors").is_file():
        return None
    try:
        summary = read_json(path)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("fingerprint") == fingerprint else None


def _prepare_output(out: Path, fingerprint: str) -> None:
    """Keep checkpoints of this very training (resume); drop stale and half-written ones."""
    ckpt_dir = out / "checkpoints"
    state = _read_state(ckpt_dir)
    if state and state.get("fingerprint") != fingerprint:
        log.warning(
            "run_dir/train holds a training with other params or data (fingerprint %s, now %s): "
            "starting over instead of resuming it",
            state.get("fingerprint"),
            fingerprint,
        )
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    elif not state and ckpt_dir.is_dir():
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # checkpoints of unknown origin: not resumable
    # A summary or adapter from other params must not outlive the training that replaces them.
    for stale in (out / SUMMARY_FILE, out / "adapter"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for path in _checkpoints(ckpt_dir):
        if not _is_complete(path):
            log.warning("removing half-written checkpoint %s (crashed while saving)", path.name)
            shutil.rmtree(path, ignore_errors=True)
    if not state or state.get("fingerprint") != fingerprint:
        write_json_atomic(ckpt_dir / STATE_FILE, {"fingerprint": fingerprint})


def _read_state(ckpt_dir: Path) -> dict[str, Any]:
    try:
        state = read_json(ckpt_dir / STATE_FILE)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _update_state(ckpt_dir: Path, **values: Any) -> None:
    write_json_atomic(ckpt_dir / STATE_FILE, {**_read_state(ckpt_dir), **values})


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    found = []
    for path in ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if path.is_dir() and suffix.isdigit():
            found.append(path)
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _is_complete(path: Path) -> bool:
    """Trainer._save_checkpoint writes adapter, optimizer, scheduler, RNG state, then trainer_state.json."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    step = int(path.name[len(CHECKPOINT_PREFIX) :])
    weights = (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
    optimizer = any(path.glob("optimizer*"))
    return (
        state.get("global_step") == step
        and weights
        and optimizer
        and (path / "scheduler.pt").is_file()
        and any(path.glob("rng_state*.pth"))
    )


def _latest_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    complete = [p for p in _checkpoints(ckpt_dir) if _is_complete(p)]
    return complete[-1] if complete else None


def _result(summary: dict[str, Any], out: Path, status: str) -> dict[str, Any]:
    return {
        "status": status,
        "adapter_dir": str(out / "adapter"),
        "summary": str(out / SUMMARY_FILE),
        "steps": summary.get("steps"),
        "final_train_loss": summary.get("final_train_loss"),
        "eval_loss_before": summary.get("eval_loss_before"),
        "eval_loss_after": summary.get("eval_loss_after"),
        "tokens_per_second": summary.get("tokens_per_second"),
        "mlflow_run_id": summary.get("mlflow_run_id"),
        "resumed_from_step": summary.get("resumed_from_step"),
    }


# ------------------------------------------------------------------------------- base and checks


@dataclass(frozen=True)
class _Base:
    """Where the base model comes from: a local directory or a hub id."""

    ref: str
    local: bool


def _resolve_base(cfg: Config, build: bool) -> _Base:
    """The base model to load; refuses a missing path or one without safetensors weights."""
    if cfg.base.kind == "tiny" and build:
        from tasks.plumbing.base import build_base_model

        build_base_model(cfg)
    name = cfg.base.name_or_path
    path = cfg.resolve(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"base.name_or_path: {path} has no config.json (not a Hugging Face model directory)"
            )
        if not any(path.glob("*.safetensors")):
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if not pickles:
                raise UserError(f"base.name_or_path: {path} holds no model weights (*.safetensors)")
            if not cfg.base.allow_pickle_weights:
                raise UserError(
                    f"base.name_or_path: {path} has no *.safetensors weights, only pickle files "
                    f"({', '.join(pickles[:3])}); convert them, or set base.allow_pickle_weights=true "
                    "if you trust them (loading a pickle can execute code)"
                )
        return _Base(str(path), local=True)
    if path.exists():
        raise UserError(f"base.name_or_path: {path} is a file; expected a model directory or a hub id")
    if cfg.base.kind == "tiny" or not _HUB_ID.match(name) or name.startswith((".", "~")):
        raise UserError(
            f"base.name_or_path: {path} does not exist"
            + ("; run `qa-lora base` to build the tiny base" if cfg.base.kind == "tiny" else "")
        )
    return _Base(name, local=False)


def _hub_kwargs(cfg: Config) -> dict[str, Any]:
    return {"revision": cfg.base.revision, "trust_remote_code": cfg.base.trust_remote_code}


def _load_model_config(cfg: Config, base: _Base) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base.ref, **_hub_kwargs(cfg))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in str(exc) and not cfg.base.trust_remote_code:
            raise UserError(
                f"base.name_or_path: {base.ref!r} needs its own model code to load; it is not run unless "
                "you set base.trust_remote_code: true (review that code first)"
            ) from None
        raise UserError(f"base.name_or_path: cannot load the config of {base.ref!r}: {first}") from None


def _inspect_base(cfg: Config, base: _Base) -> dict[str, Any]:
    """Check the params against the model (on the meta device: no weights read) before any step.

    Returns the model facts the device plan needs (sizes, layers, LoRA parameter count).
    """
    import torch
    from transformers import AutoModelForCausalLM

    t = cfg.train
    if t.learning_rate <= 0:  # the config refuses it too; this stage must not depend on that
        raise UserError(f"train.learning_rate: must be > 0 (got {t.learning_rate})")
    if cfg.lora.r <= 0:
        raise UserError(f"lora.r: must be > 0 (got {cfg.lora.r})")
    mconf = _load_model_config(cfg, base)
    text = mconf.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    if limit is not None and t.max_length > limit:
        raise UserError(
            f"train.max_length: {t.max_length} exceeds the base model's max_position_embeddings "
            f"{limit} ({base.ref}); use a value <= {limit}"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mconf, trust_remote_code=cfg.base.trust_remote_code)
    lora_params = _check_target_modules(cfg, model, base)
    return {
        "model_type": getattr(mconf, "model_type", None),
        "total_params": sum(p.numel() for p in model.parameters()),
        "lora_params": lora_params,
        "num_layers": getattr(text, "num_hidden_layers", 1),
        "hidden_size": getattr(text, "hidden_size", 0),
        "vocab_size": getattr(text, "vocab_size", 0),
        "max_position_embeddings": limit,
    }


def _check_target_modules(cfg: Config, model: Any, base: _Base) -> int:
    """Every lora.target_modules entry must name a Linear/Embedding of the model (PEFT suffix match).

    Returns the LoRA parameter count these targets give at rank lora.r.
    """
    import torch

    r = cfg.lora.r
    targets = cfg.lora.target_modules
    named = dict(model.named_modules())

    def lora_size(module: Any) -> int:
        if isinstance(module, torch.nn.Linear):
            return r * (module.in_features + module.out_features)
        if isinstance(module, torch.nn.Embedding):
            return r * (module.num_embeddings + module.embedding_dim)
        return 0

    if targets == ("all-linear",):  # PEFT's shorthand: every Linear except the output head
        out_head = model.get_output_embeddings()
        return sum(
            lora_size(m) for m in named.values() if isinstance(m, torch.nn.Linear) and m is not out_head
        )

    leaf_names = sorted({name.rsplit(".", 1)[-1] for name, m in named.items() if lora_size(m)})
    total = 0
    for target in targets:
        matches = [m for name, m in named.items() if name == target or name.endswith("." + target)]
        if not matches:
            raise UserError(
                f"lora.target_modules: {target!r} matches no module of {base.ref}; "
                f"adaptable modules here: {', '.join(leaf_names)} (or all-linear)"
            )
        sizes = [lora_size(m) for m in matches]
        if not any(sizes):
            kinds = sorted({type(m).__name__ for m in matches})
            raise UserError(
                f"lora.target_modules: {target!r} names {', '.join(kinds)} modules, which LoRA cannot "
                f"adapt here; use Linear or Embedding modules such as {', '.join(leaf_names[:6])}"
            )
        total += sum(sizes)
    return total


# ----------------------------------------------------------------------------------------- data


def _prompt_completion(rows: list[dict[str, str]]) -> Any:
    """Rows -> a datasets.Dataset in TRL's prompt/completion format (the completion ends with EOS)."""
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": format_prompt(r["question"]), "completion": format_completion(r["answer"])} for r in rows]
    )


class _EpochSampler:
    """Seeded per-epoch order; with `lengths`, batches of similar length (transformers 5 dropped
    `group_by_length`; its `train_sampling_strategy="group_by_length"` groups per-device batches, so N
    processes would see other samples per step than one process).

    Indices are shuffled, cut into mega-batches of 50 global batches, sorted by length inside each,
    cut into global batches (per-device batch x processes x accumulation), and the full global
    batches are shuffled; the longest one goes first (an out-of-memory shows at step 1, not at the
    end) and a partial last batch stays last. accelerate hands each process consecutive per-device
    slices of this order, so every optimizer step trains on the same samples whatever the number of
    processes. The epoch seed makes a resumed run replay exactly the uninterrupted order.
    """

    def __init__(self, size: int, seed: int, global_batch: int, lengths: list[int] | None = None) -> None:
        self.size = size
        self.seed = seed
        self.global_batch = global_batch
        self.lengths = lengths
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Any:
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return iter(order)
        lengths, size = self.lengths, self.global_batch
        mega = size * 50
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        tail = [batches.pop()] if batches and len(batches[-1]) < size else []
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
        if batches:
            longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
            batches[0], batches[longest] = batches[longest], batches[0]
        return iter([i for batch in batches + tail for i in batch])


def _check_collation(trainer: Any, tokenizer: Any) -> dict[str, Any]:
    """Inspect the prepared data and one collated batch: prompt masked, EOS trained once, pad != EOS.

    Raises RuntimeError (a template or tokenizer bug, not a user error) when one does not hold.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    data = trainer.train_dataset
    labels_col = data["labels"]
    truncated = sum(1 for labels in labels_col if not labels or labels[-1] != eos)
    if truncated:
        log.warning(
            "%d of %d train rows were cut at train.max_length and lose their EOS "
            "(validation's too_long policy should have dropped them)",
            truncated,
            len(labels_col),
        )
    lengths = [len(ids) for ids in data["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sample = [order[0], order[len(order) // 2], order[-1]]  # different lengths: padding shows
    batch = trainer.data_collator([data[i] for i in sample])
    problems = []
    if pad == eos:
        problems.append(f"pad token id {pad} equals EOS")
    for row in range(len(sample)):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        n = int(mask.sum())
        trained = (labels != -100).nonzero().flatten().tolist()
        if not trained:
            problems.append(f"row {sample[row]} has no trained tokens")
            continue
        if trained[0] == 0 or (labels[: trained[0]] != -100).any():
            problems.append(f"row {sample[row]}: the prompt is not masked")
        if (labels[n:] != -100).any() or (ids[n:] != pad).any():
            problems.append(f"row {sample[row]}: padding is not pad/-100")
        eos_trained = int((labels == eos).sum())
        if labels_col[sample[row]][-1] == eos and (int(ids[n - 1]) != eos or eos_trained != 1):
            problems.append(
                f"row {sample[row]}: expected exactly one trained EOS at the end, found {eos_trained}"
            )
    if problems:
        raise RuntimeError("collated batch check failed: " + "; ".join(problems))
    log.info(
        "collated batch check: prompt masked, one EOS (id %d) trained at the end, pad id %d; "
        "train lengths %d..%d tokens (median %d)",
        eos,
        pad,
        lengths[order[0]],
        lengths[order[-1]],
        lengths[order[len(order) // 2]],
    )
    return {
        "truncated_rows": truncated,
        "min_tokens": lengths[order[0]],
        "median_tokens": lengths[order[len(order) // 2]],
        "max_tokens": lengths[order[-1]],
    }


# ------------------------------------------------------------------------------------- training


def _load_tokenizer(cfg: Config, base: _Base) -> tuple[Any, str | None]:
    """The base tokenizer with a pad token distinct from EOS (Llama-2 ships none: use unk)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.ref, **_hub_kwargs(cfg))
    if tokenizer.eos_token_id is None:
        raise UserError(f"base.name_or_path: the tokenizer of {base.ref} has no EOS token")
    note = None
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token_id is None or tokenizer.unk_token_id == tokenizer.eos_token_id:
            raise UserError(
                f"base.name_or_path: the tokenizer of {base.ref} has no pad token distinct from EOS "
                "(padding with EOS would teach the model never to stop)"
            )
        tokenizer.pad_token = tokenizer.unk_token
        note = f"pad token set to {tokenizer.unk_token!r} (the tokenizer had none distinct from EOS)"
        log.info(note)
    tokenizer.padding_side = "right"
    return tokenizer, note


def _load_model(cfg: Config, base: _Base, plan: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[plan.precision]
    kwargs: dict[str, Any] = {
        **_hub_kwargs(cfg),
        "dtype": dtype,
        "attn_implementation": plan.attn_implementation,
        # safetensors only, unless the user accepted pickles (they can execute code when loaded)
        "use_safetensors": None if cfg.base.allow_pickle_weights else True,
    }
    if plan.device == "cuda" and not (cfg.train.num_processes > 1 and cfg.train.distributed == "fsdp"):
        # Straight onto this process's GPU: N processes would otherwise each stage a full copy in host RAM.
        # (FSDP loads on rank 0 only and broadcasts: cpu_ram_efficient_loading.)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        return AutoModelForCausalLM.from_pretrained(base.ref, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"base.name_or_path: cannot load {base.ref!r}: {first}") from None


def _device_args(plan: Any, world: int, distributed: str, cpu_count: int) -> dict[str, Any]:
    """The SFTConfig fields that depend on the device plan; TRL's defaults (bf16 + gradient
    checkpointing) are never left standing."""
    on_gpu = plan.device == "cuda"
    fsdp = world > 1 and distributed == "fsdp"
    args: dict[str, Any] = {
        "use_cpu": not on_gpu,
        "bf16": plan.precision == "bf16",
        "fp16": plan.precision == "fp16",
        # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; the new name
        # wins over TRL's `gradient_checkpointing=True` default.
        "activation_checkpointing": plan.gradient_checkpointing and not fsdp,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if plan.gradient_checkpointing else None,
        "ddp_backend": ("nccl" if on_gpu else "gloo") if world > 1 else None,  # nccl is RCCL on ROCm
        "ddp_find_unused_parameters": False,  # every LoRA parameter gets a gradient each step
        "pad_to_multiple_of": 8 if on_gpu else None,  # tensor-core friendly shapes on GPUs; waste on CPU
        # Workers would compete with the compute threads on a small CPU; on a GPU node they hide
        # collation behind the GPU's work.
        "dataloader_num_workers": min(4, max(1, cpu_count // world - 1)) if on_gpu else 0,
        "dataloader_pin_memory": on_gpu,
    }
    if fsdp:
        # FSDP2 shards the frozen base across processes (70B-class bases); FSDP's own activation
        # checkpointing replaces the Trainer flag, which would add an all-gather in the backward pass.
        args["fsdp"] = True
        args["fsdp_config"] = {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": plan.gradient_checkpointing,
            "cpu_ram_efficient_loading": True,
        }
    return args


def _sft_config(cfg: Config, plan: Any, ckpt_dir: Path, world: int, cpu_count: int) -> Any:
    """Every field that matters is set here from params and the device plan, none left to defaults."""
    from trl import SFTConfig

    t = cfg.train
    return SFTConfig(
        output_dir=str(ckpt_dir),
        seed=t.seed,
        data_seed=t.seed,
        # schedule
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,  # -1: epochs decide
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        # data: prompt/completion, loss on the completion only, no packing (padding_free needs flash-attn)
        max_length=t.max_length,
        completion_only_loss=True,
        packing=False,
        padding_free=False,
        dataset_num_proc=None,
        include_num_input_tokens_seen="non_padding",  # counted from attention masks, kept in checkpoints
        # checkpoints, logging
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        save_only_model=False,  # optimizer, scheduler and RNG state: resume continues exactly
        eval_strategy="no",  # eval loss before and after, explicitly (cheaper than periodic evals)
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        report_to="none",  # MLflow through tasks/tracking.py, one run per training
        disable_tqdm=not sys.stderr.isatty(),  # progress bars garble non-TTY logs (Airflow)
        **_device_args(plan, world, t.distributed, cpu_count),
    )


def _lora_config(lora: LoraSection) -> Any:
    """The `lora:` params as a PEFT LoraConfig for a causal LM (the one translation; the benchmarks and
    the reference-preset test build their adapters with it too)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if lora.target_modules == ("all-linear",) else list(lora.target_modules),
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def _trainer_class() -> type:
    from transformers import Trainer
    from trl import SFTTrainer

    class QATrainer(SFTTrainer):
        """SFTTrainer with the seeded, global-batch length-grouped sampler (see _EpochSampler) and,
        where it is faster, the model's own loss instead of TRL's fused LM head."""

        def __init__(
            self, *args: Any, group_by_length: bool, plain_loss: bool = False, **kwargs: Any
        ) -> None:
            self._qa_group_by_length = group_by_length
            self._qa_plain_loss = plain_loss
            super().__init__(*args, **kwargs)

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if not self._qa_plain_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # On CPU, TRL's tiled fused LM head (built for GPUs: no full logits in memory) and its
            # entropy/accuracy metrics cost ~30% of a step here; the model's own loss is one matmul
            # and the same number (sum over completion tokens / num_items_in_batch, scaled for DDP).
            return Trainer.compute_loss(
                self, model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch
            )

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            data = train_dataset if train_dataset is not None else self.train_dataset
            a = self.args
            global_batch = (
                a.per_device_train_batch_size * a.gradient_accumulation_steps * max(1, a.world_size)
            )
            lengths = [len(ids) for ids in data["input_ids"]] if self._qa_group_by_length else None
            return _EpochSampler(len(data), a.seed, global_batch, lengths)

    return QATrainer


def _reporter(run_id: str | None, ckpt_dir: Path, main: bool) -> Any:
    """Progress lines (step, loss, tokens/s, ETA) in the log, per-step metrics in MLflow, and the
    eval loss before training (Trainer's eval_on_start), saved at once so a resumed attempt keeps it."""
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = 0.0
            self.step0 = 0
            self.last: tuple[float, int] = (0.0, 0)
            self.t1 = 0.0
            self.eval_losses: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()
            self.step0 = state.global_step
            self.last = (self.t0, state.num_input_tokens_seen)
            if main:
                log.info("training: step %d of %d", state.global_step, state.max_steps)

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
        ) -> None:
            loss = float((metrics or {}).get("eval_loss", float("nan")))
            self.eval_losses.append(loss)
            if len(self.eval_losses) == 1 and args.eval_on_start and state.global_step == self.step0:
                # the steps start now: the eval before training is not training throughput
                self.t0 = time.perf_counter()
                self.last = (self.t0, state.num_input_tokens_seen)
            if main and len(self.eval_losses) == 1 and args.eval_on_start:
                _update_state(ckpt_dir, eval_loss_before=loss)
                log.info("eval loss before training: %.4f", loss)
                if run_id:
                    _mlflow_metrics(run_id, {"eval_loss": loss}, state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t1 = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if not main or not logs or "loss" not in logs:
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
            if run_id is None:
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
            _mlflow_metrics(run_id, values, state.global_step)

    return Reporter()


def _mlflow_metrics(run_id: str, values: dict[str, Any], step: int) -> None:
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


def _start_mlflow_run(cfg: Config, run_dir: Path, ckpt_dir: Path, params: dict[str, Any]) -> str:
    """One MLflow run per training: created once, reopened by a resumed attempt."""
    import mlflow

    from tasks.plumbing.tracking import setup_mlflow

    experiment_id = setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    run_id = _read_state(ckpt_dir).get("mlflow_run_id")
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
            log.info("MLflow: continuing run %s", run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            log.warning(
                "MLflow run %s not found in %s: starting a new one", run_id, cfg.register.tracking_uri
            )
    run = client.create_run(
        experiment_id,
        run_name=f"train-{run_dir.name}",
        tags={
            "qa_lora.stage": "train",
            "qa_lora.run_dir": str(run_dir),
            "qa_lora.params_hash": cfg.params_hash(),
        },
    )
    run_id = run.info.run_id
    from mlflow.entities import Param

    flat = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(flat), 100):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=flat[start : start + 100])
    _update_state(ckpt_dir, mlflow_run_id=run_id)
    log.info(
        "MLflow: run %s in experiment %r (%s)", run_id, cfg.register.experiment, cfg.register.tracking_uri
    )
    return run_id


def _peak_memory(plan: Any) -> tuple[int, str]:
    import resource

    import torch

    if plan.device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process max RSS"


def _train_process(
    cfg: Config,
    run_dir: Path,
    base: _Base | None = None,
    info: dict[str, Any] | None = None,
    started: float | None = None,
) -> dict[str, Any] | None:
    """Train in this process (one of N under torchrun); rank 0 writes the outputs and returns the summary."""
    started = time.perf_counter() if started is None else started
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    main = rank == 0
    if not main:
        log.setLevel(logging.WARNING)  # one progress log, from rank 0
    run_dir = Path(run_dir).resolve()
    out = run_dir / "train"
    ckpt_dir = out / "checkpoints"
    fingerprint = _fingerprint(cfg, run_dir)
    base = base or _resolve_base(cfg, build=False)
    info = info or _inspect_base(cfg, base)
    state = _read_state(ckpt_dir)

    import torch
    from peft import get_peft_model

    from tasks.plumbing.device import detect_capabilities, estimate_train_bytes, plan_device

    # ---- device plan: nothing left to library defaults
    caps = detect_capabilities(cfg.runtime.device)
    t = cfg.train
    estimate = estimate_train_bytes(
        total_params=info["total_params"],
        trainable_params=info["lora_params"],
        num_layers=info["num_layers"],
        hidden_size=info["hidden_size"],
        vocab_size=info["vocab_size"],
        seq_len=t.max_length,
        micro_batch=t.per_device_train_batch_size,
        param_bytes=2
        if (t.precision in ("bf16", "fp16") or (t.precision == "auto" and caps.bf16_native))
        else 4,
        shards=world if t.distributed == "fsdp" else 1,
    )
    plan = plan_device(caps, t.precision, t.gradient_checkpointing, t.attn_implementation, estimate)
    os.environ.update(plan.env)  # before the first GPU kernel runs
    for reason in plan.reasons:
        log.info("device plan: %s", reason)
    if cfg.runtime.num_threads > 0:
        torch.set_num_threads(cfg.runtime.num_threads)
    if plan.device == "cpu":
        log.info("device plan: cpu, %d torch threads, %d process(es)", torch.get_num_threads(), world)
    else:
        log.info("device plan: %s (%s), %d process(es)", caps.backend, ", ".join(caps.gpu_names), world)
    if not sys.stderr.isatty():
        import datasets

        datasets.disable_progress_bars()

    # ---- tokenizer, data, model + LoRA
    tokenizer, pad_note = _load_tokenizer(cfg, base)
    paths = _split_paths(run_dir)
    train_rows, eval_rows = read_split(paths["train"], "train split"), read_split(paths["eval"], "eval split")
    model = _load_model(cfg, base, plan)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # no KV cache while training
    lora = _lora_config(cfg.lora)
    torch.manual_seed(t.seed)  # LoRA A init: the same adapter start for every attempt and process
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d on %s: %d trainable of %d parameters (%.3f%%)",
        cfg.lora.r,
        ",".join(cfg.lora.target_modules),
        trainable,
        total,
        100 * trainable / total,
    )

    args = _sft_config(cfg, plan, ckpt_dir, world, caps.cpu_count)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=_prompt_completion(train_rows),
        eval_dataset=_prompt_completion(eval_rows),
        processing_class=tokenizer,
        group_by_length=t.group_by_length,
        plain_loss=plan.device == "cpu",
    )
    data_facts = _check_collation(trainer, tokenizer)

    # ---- tracking, resume, eval before
    resume = _latest_complete_checkpoint(ckpt_dir)
    run_id = None
    if main:
        params = _mlflow_params(cfg, plan, caps, trainable, total, world, len(train_rows), len(eval_rows))
        run_id = _start_mlflow_run(cfg, run_dir, ckpt_dir, params)
    eval_before = state.get("eval_loss_before")
    # Measured by Trainer's eval_on_start, inside train(), i.e. after DDP wrapped the model: an
    # evaluate() call before train() left DDP without gradient synchronisation here (ranks diverged).
    # A resumed attempt without a saved value reports none rather than the resumed model's loss.
    args.eval_on_start = eval_before is None and resume is None
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout; the reporter logs instead
    reporter = _reporter(run_id, ckpt_dir, main)
    trainer.add_callback(reporter)
    if resume is not None:
        log.info("resuming from %s (a complete checkpoint)", resume)

    # ---- train
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Read before training: save_total_limit may rotate the resumed-from checkpoint away meanwhile.
    tokens_at_resume = _tokens_at(resume)
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException:
        if main and run_id:
            import mlflow

            mlflow.MlflowClient().set_terminated(run_id, status="FAILED")
        raise
    if args.eval_on_start:
        eval_before = reporter.eval_losses[0]
    eval_after = float(trainer.evaluate()["eval_loss"])
    log.info("eval loss after training: %.4f (before %s)", eval_after, eval_before)

    # ---- outputs: every process takes part in saving (FSDP gathers the shards), rank 0 writes
    tmp = out / ".staging-adapter"  # not atomic_dir's own .tmp- name
    if main and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if not main:
        return None
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the summary records the args
    with atomic_dir(out / "adapter") as final_tmp:
        for item in tmp.iterdir():
            shutil.move(str(item), final_tmp / item.name)
        tokenizer.save_pretrained(final_tmp)
    shutil.rmtree(tmp, ignore_errors=True)

    st = trainer.state
    history = [
        {k: h[k] for k in ("step", "epoch", "loss", "learning_rate", "grad_norm") if k in h}
        for h in st.log_history
        if "loss" in h
    ]
    runtime = float(output.metrics.get("train_runtime", 0.0))  # includes the eval before training
    step_seconds = max(reporter.t1 - reporter.t0, 1e-9)  # the optimizer steps (and checkpoints) only
    session_tokens = int(st.num_input_tokens_seen) - tokens_at_resume
    peak, peak_kind = _peak_memory(plan)
    summary = {
        "fingerprint": fingerprint,
        "params_hash": cfg.params_hash(),
        "run_dir": str(run_dir),
        "adapter_dir": str(out / "adapter"),
        "device": {
            "backend": caps.backend,
            "device": plan.device,
            "gpus": list(caps.gpu_names),
            "torch": caps.torch_version,
            "hip": caps.hip_version,
            "cuda": caps.cuda_version,
            "cpu_count": caps.cpu_count,
            "torch_threads": torch.get_num_threads() if plan.device == "cpu" else None,
        },
        "precision": plan.precision,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "attn_implementation": plan.attn_implementation,
        "plan": plan.to_dict(),
        "plan_reasons": list(plan.reasons),
        "train_memory_estimate_bytes": estimate,
        "processes": world,
        "distributed": t.distributed if world > 1 else None,
        "base": {"name_or_path": base.ref, "revision": cfg.base.revision, "kind": cfg.base.kind},
        "lora": cfg.lora.model_dump(mode="json"),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_share": trainable / total,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "data": data_facts,
        "pad_token": tokenizer.pad_token,
        "pad_token_note": pad_note,
        "steps": int(st.global_step),
        "max_steps": int(st.max_steps),
        "epochs": float(st.epoch or 0.0),
        "global_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * world,
        "tokens_seen": int(st.num_input_tokens_seen),
        "tokens_seen_this_attempt": session_tokens,
        "tokens_per_second": session_tokens / step_seconds,
        "train_seconds": step_seconds,
        "train_runtime_seconds": runtime,
        "wall_seconds": time.perf_counter() - started,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "final_train_loss": history[-1]["loss"] if history else None,
        "mean_train_loss_this_attempt": float(output.training_loss),
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "loss_history": history,
        "resumed_from_step": _step_of(resume),
        "translations": {
            "warmup_ratio": f"warmup_steps={t.warmup_ratio} (transformers 5 reads a float < 1 as a ratio)",
            "group_by_length": (
                "seeded length-grouped sampler over global batches of "
                f"{t.per_device_train_batch_size * t.gradient_accumulation_steps * world} (mega-batches of 50)"
                if t.group_by_length
                else "off: seeded random order"
            ),
            "max_steps": "epochs (num_train_epochs)"
            if t.max_steps == -1
            else f"{t.max_steps} optimizer steps",
        },
        "mlflow_run_id": run_id,
        "library_versions": _versions(),
    }
    write_json_atomic(out / SUMMARY_FILE, summary)
    # The loss curve as a table: `dvc plots show` draws it (train/loss.csv in dvc.yaml).
    rows = [f"{h['step']},{h['loss']:.6f},{h.get('learning_rate', 0.0):.6g}" for h in history if "loss" in h]
    write_text_atomic(out / "loss.csv", "\n".join(["step,loss,learning_rate", *rows]) + "\n")
    if run_id:
        _finish_mlflow_run(run_id, summary, out / SUMMARY_FILE)
    log.info(
        "trained %d steps (%.2f epochs) in %.0fs: %.0f tokens/s, eval loss %.4f -> %.4f; adapter at %s",
        summary["steps"],
        summary["epochs"],
        runtime,
        summary["tokens_per_second"] or 0.0,
        eval_before,
        eval_after,
        out / "adapter",
    )
    return summary


def _step_of(checkpoint: Path | None) -> int | None:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX) :]) if checkpoint else None


def _tokens_at(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    return int(read_json(checkpoint / "trainer_state.json").get("num_input_tokens_seen", 0))


def _mlflow_params(
    cfg: Config, plan: Any, caps: Any, trainable: int, total: int, world: int, n_train: int, n_eval: int
) -> dict[str, Any]:
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
            "processes": world,
            "trainable_params": trainable,
            "total_params": total,
            "train_rows": n_train,
            "eval_rows": n_eval,
        }
    )
    return params


def _finish_mlflow_run(run_id: str, summary: dict[str, Any], summary_path: Path) -> None:
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
    _mlflow_metrics(run_id, final, summary["steps"])
    client.log_artifact(run_id, str(summary_path))
    client.set_terminated(run_id, status="FINISHED")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found
