"""One training process (the only one, or one of N under torchrun), as a sequence of named steps.

plan (device plan: precision, checkpointing, attention; nothing left to library defaults) -> load
(tokenizer, splits, base + LoRA) -> build trainer (SFTConfig from the plan, collated-batch check, MLflow
run, resume point) -> fit (train, eval after) -> save the adapter (every process takes part, rank 0
writes) -> summarise (train_summary.json, loss.csv, MLflow). Rank 0 returns the summary, others None.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir
from tasks.core.config import Config
from tasks.core.layout import RunLayout
from tasks.plumbing.cards import scrub_adapter_card
from tasks.plumbing.chat import chat_format
from tasks.plumbing.general_text import replay_documents
from tasks.plumbing.loading import BaseRef, load_tokenizer, resolve_base
from tasks.stages.train.checkpoints import (
    latest_complete_checkpoint,
    read_state,
    remove_incomplete,
    tokens_at,
    training_fingerprint,
)
from tasks.stages.train.data import check_collation, tokenized_split, with_replay
from tasks.stages.train.model import inspect_base, load_model, lora_config
from tasks.stages.train.probe import apply_verdict, kernels_verdict, precision_verdict
from tasks.stages.train.reporting import (
    build_summary,
    fail_mlflow_run,
    held_params,
    make_reporter,
    mlflow_params,
    start_mlflow_run,
    write_outputs,
)
from tasks.stages.train.session import Context, DeviceChoice, Fit, Inputs, Outcome
from tasks.stages.train.trainer import sft_config, trainer_class

log = logging.getLogger("qa_lora.train")


def train_process(
    cfg: Config,
    run_dir: Path,
    *,
    base: BaseRef | None = None,
    info: dict[str, Any] | None = None,
    started: float | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any] | None:
    """Train in this process (one of N under torchrun); rank 0 writes the outputs.

    Args:
        cfg: the pipeline configuration.
        run_dir: this run's directory (prepared by the stage: splits present, stale outputs removed).
        base: the resolved base model (resolved here when None, as in a torchrun worker).
        info: model facts from `inspect_base` (computed here when None).
        started: perf_counter time the stage started (the summary's wall_seconds counts from it).
        callbacks: extra transformers TrainerCallbacks (benchmarks time steps with them).

    Returns:
        The train summary on rank 0; None on the other ranks.
    """
    started = time.perf_counter() if started is None else started
    ctx = open_context(cfg, run_dir, base, info)
    device = plan_training(ctx)
    inputs = load_inputs(ctx, device)
    fit = build_trainer(ctx, device, inputs, callbacks)
    outcome = fit_and_evaluate(ctx, device, fit)
    if not save_adapter(ctx, fit.trainer, inputs.tokenizer, inputs.chat):
        return None
    summary = build_summary(ctx, device, inputs, fit, outcome, started)
    write_outputs(ctx, summary, fit.run_id)
    return summary


def open_context(cfg: Config, run_dir: Path, base: BaseRef | None, info: dict[str, Any] | None) -> Context:
    """Rank and world size from torchrun's environment, the run's layout, fingerprint and state."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if rank != 0:
        log.setLevel(logging.WARNING)  # one progress log, from rank 0
    layout = RunLayout.of(run_dir)
    if rank == 0 and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        remove_incomplete(layout.checkpoints_dir)  # the worker group was restarted: saves may be cut short
    base = base or resolve_base(cfg)
    return Context(
        cfg=cfg,
        layout=layout,
        rank=rank,
        world=world,
        fingerprint=training_fingerprint(cfg, layout),
        base=base,
        info=info or inspect_base(cfg, base),
        state=read_state(layout.checkpoints_dir),
    )


def plan_training(ctx: Context) -> DeviceChoice:
    """The device plan for this machine and model (precision, checkpointing, attention, kernels), applied.

    `train.precision: auto` and `train.kernels: auto` are measured where the device offers a choice
    (see probe.py).
    """
    import torch

    from tasks.plumbing.device import detect_capabilities, estimate_train_bytes, plan_device

    cfg, t, info = ctx.cfg, ctx.cfg.train, ctx.info
    if cfg.runtime.num_threads > 0:
        torch.set_num_threads(cfg.runtime.num_threads)  # before the precision probe: it times with them
    caps = detect_capabilities(cfg.runtime.device)
    verdict = precision_verdict(cfg, ctx.layout, ctx.base, info, caps)  # None: nothing was measured
    precision = verdict.precision if verdict else t.precision
    half = precision in ("bf16", "fp16") or (precision == "auto" and caps.bf16_native)
    estimate = estimate_train_bytes(
        total_params=info["total_params"],
        trainable_params=info["lora_params"] + info["saved_params"],
        num_layers=info["num_layers"],
        hidden_size=info["hidden_size"],
        vocab_size=info["vocab_size"],
        seq_len=t.max_length,
        micro_batch=t.per_device_train_batch_size,
        param_bytes=2 if half else 4,
        shards=ctx.world if t.distributed == "fsdp" else 1,
    )
    plan = plan_device(caps, precision, t.gradient_checkpointing, t.attn_implementation, estimate, t.kernels)
    plan = apply_verdict(plan, verdict)
    kernels = kernels_verdict(cfg, ctx.layout, ctx.base, info, caps, plan.precision)
    plan = apply_verdict(plan, kernels)
    os.environ.update(plan.env)  # before the first GPU kernel runs
    for reason in plan.reasons:
        log.info("device plan: %s", reason)
    if plan.device == "cpu":
        log.info("device plan: cpu, %d torch threads, %d process(es)", torch.get_num_threads(), ctx.world)
    else:
        log.info("device plan: %s (%s), %d process(es)", caps.backend, ", ".join(caps.gpu_names), ctx.world)
    if not sys.stderr.isatty():
        import datasets

        datasets.disable_progress_bars()
    return DeviceChoice(caps=caps, plan=plan, estimate=estimate, verdict=verdict, kernels_verdict=kernels)


def load_inputs(ctx: Context, device: DeviceChoice) -> Inputs:
    """Tokenizer (the one loader and pad rule, right padding) and its chat format, both splits tokenized
    (once: later attempts and other processes map the cached Arrow files), the base wrapped in LoRA."""
    import torch
    from filelock import FileLock
    from peft import get_peft_model

    cfg, layout = ctx.cfg, ctx.layout
    tokenizer = load_tokenizer(cfg, padding_side="right")
    chat = chat_format(cfg, tokenizer)
    layout.tokenized_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(layout.tokenized_dir / ".lock")):  # the first process tokenizes, the others reuse it
        train_data = tokenized_split(chat, layout.train_split, layout.tokenized_dir, cfg.train.max_length)
        sft_rows = len(train_data)
        replay = replay_documents(cfg)
        if replay is not None:
            t = cfg.train
            settings = (t.replay_ratio, min(t.replay_block_tokens, t.max_length), t.seed)
            train_data = with_replay(chat, train_data, replay[0], settings, layout.tokenized_dir)
        eval_data = tokenized_split(
            chat, layout.eval_split, layout.tokenized_dir, cfg.train.max_length, sample=cfg.eval.max_rows
        )
    model = load_model(cfg, ctx.base, device.plan)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # no KV cache while training
    torch.manual_seed(cfg.train.seed)  # LoRA A init: the same adapter start for every attempt and process
    model = get_peft_model(model, lora_config(cfg.lora))
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d on %s%s: %d trainable of %d parameters (%.3f%%)",
        cfg.lora.r,
        ",".join(cfg.lora.target_modules),
        f", trained in full: {','.join(cfg.lora.modules_to_save)}" if cfg.lora.modules_to_save else "",
        trainable,
        total,
        100 * trainable / total,
    )
    return Inputs(tokenizer, chat, train_data, eval_data, model, int(trainable), int(total), sft_rows)


def build_trainer(ctx: Context, device: DeviceChoice, inputs: Inputs, callbacks: Sequence[Any] = ()) -> Fit:
    """The Trainer with its data checked, the MLflow run opened, the resume point and eval plan set."""
    from transformers.trainer_callback import PrinterCallback

    cfg, plan = ctx.cfg, device.plan
    args = sft_config(cfg, plan, ctx.ckpt_dir, ctx.world, device.caps.cpu_count)
    trainer = trainer_class()(
        model=inputs.model,
        args=args,
        train_dataset=inputs.train_data,
        eval_dataset=inputs.eval_data,
        processing_class=inputs.tokenizer,
        group_by_length=cfg.train.group_by_length,
        plain_loss=plan.device == "cpu",
    )
    data_facts = check_collation(trainer, inputs.chat, inputs.sft_rows)
    if ctx.world > 1 and cfg.train.distributed == "fsdp" and not trainer.is_fsdp_enabled:
        # shard_on_cpu enters it on CPU; a library change must not slip through as unsharded training
        raise RuntimeError(
            "train.distributed=fsdp, but the Trainer did not enable FSDP: it would train unsharded"
        )
    resume = latest_complete_checkpoint(ctx.ckpt_dir)
    run_id = None
    if ctx.main:
        counts = {
            "processes": ctx.world,
            "trainable_params": inputs.trainable,
            "total_params": inputs.total,
            "train_rows": inputs.sft_rows,
            "replay_blocks": len(inputs.train_data) - inputs.sft_rows,
            "eval_rows": len(inputs.eval_data),
            "chat.fingerprint": inputs.chat.fingerprint,
            "chat.template": inputs.chat.source,
            "chat.end_of_turn": inputs.chat.end_of_turn,
        }
        run_id = start_mlflow_run(
            cfg, ctx.layout.root, ctx.ckpt_dir, mlflow_params(cfg, plan, device.caps, counts)
        )
    eval_before = ctx.state.get("eval_loss_before")
    # Measured by Trainer's eval_on_start, inside train(), i.e. after DDP wrapped the model: an
    # evaluate() call before train() left DDP without gradient synchronisation here (ranks diverged).
    # A resumed attempt without a saved value reports none rather than the resumed model's loss.
    args.eval_on_start = eval_before is None and resume is None
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout; the reporter logs instead
    reporter = make_reporter(run_id, ctx.ckpt_dir, ctx.main)
    for callback in (reporter, *callbacks):
        trainer.add_callback(callback)
    if resume is not None:
        log.info("resuming from %s (a complete checkpoint)", resume)
    # Read before training: save_total_limit may rotate the resumed-from checkpoint away meanwhile.
    return Fit(trainer, args, reporter, resume, run_id, data_facts, eval_before, tokens_at(resume))


def fit_and_evaluate(ctx: Context, device: DeviceChoice, fit: Fit) -> Outcome:
    """Train (from the resume point), then measure the eval loss after training."""
    import torch

    if device.plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        output = fit.trainer.train(resume_from_checkpoint=str(fit.resume) if fit.resume else None)
    except BaseException:
        if ctx.main:
            fail_mlflow_run(fit.run_id)
        raise
    eval_before = fit.reporter.eval_losses[0] if fit.args.eval_on_start else fit.eval_before
    eval_after = float(fit.trainer.evaluate()["eval_loss"])
    log.info("eval loss after training: %.4f (before %s)", eval_after, eval_before)
    return Outcome(output=output, eval_before=eval_before, eval_after=eval_after)


def save_adapter(ctx: Context, trainer: Any, tokenizer: Any, chat: Any) -> bool:
    """Every process takes part in saving (FSDP gathers the shards); rank 0 writes the adapter with its
    tokenizer and chat format (chat_format.json: what evaluate and export check the base against),
    atomically. Returns whether this process is rank 0 (the one that goes on)."""
    tmp = ctx.layout.train_dir / ".staging-adapter"  # not atomic_dir's own .tmp- name
    if ctx.main and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_fsdp_enabled:
        gather_adapter(trainer, tmp, ctx.main)
    else:
        trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if not ctx.main:
        return False
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the summary records the args
    with atomic_dir(ctx.layout.adapter_dir) as final_tmp:
        for item in tmp.iterdir():
            shutil.move(str(item), final_tmp / item.name)
        tokenizer.save_pretrained(final_tmp)
        chat.frame().save(final_tmp)
        scrub_adapter_card(final_tmp / "README.md", ctx.cfg)
    shutil.rmtree(tmp, ignore_errors=True)
    return True


def gather_adapter(trainer: Any, directory: Path, main: bool) -> None:
    """FSDP: every process sends its shards of the *trained* weights to rank 0, which writes them as a
    plain PEFT adapter. The frozen base is left sharded (gathering it would put a 70B base in rank 0's
    memory); the Trainer's own save writes nothing under sharded checkpoints."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(trainer.model, options=options)
    if main:
        total = sum(p.numel() for p in trainer.model.parameters())  # a DTensor's numel is the full size
        log.info("FSDP: rank 0 held %d of %d parameters (its shards)", held_params(trainer.model), total)
        trainer.model.save_pretrained(str(directory), state_dict=state)
