"""The Trainer: SFTConfig set explicitly from params and the device plan, and the SFTTrainer subclass.

* Every SFTConfig field that TRL would otherwise default (bf16 + gradient checkpointing, which made a
  CPU run 21x slower here) is set from the plan of tasks.plumbing.device.
* Library translations (transformers 5): `train.warmup_ratio` -> `warmup_steps` as a float ratio;
  `train.group_by_length` -> a seeded length-grouped sampler over *global* batches (so N processes
  see the same samples per optimizer step as one process); `max_steps: -1` -> epochs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.stages.train.data import EpochSampler, sequence_lengths

GPU_PAD_MULTIPLE = 64  # at most max_length / 64 sequence lengths per run (4 at 256, 16 at 1024)


def device_args(plan: Any, world: int, distributed: str, cpu_count: int) -> dict[str, Any]:
    """The SFTConfig fields that depend on the device plan.

    TRL's defaults (bf16 + gradient checkpointing) are never left standing.

    Args:
        plan: the DevicePlan of tasks.plumbing.device.
        world: number of training processes.
        distributed: `train.distributed` ("ddp" or "fsdp"; used when `world > 1`).
        cpu_count: CPU cores of the machine (dataloader workers on GPUs).
    """
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
        # GPUs: coarse lengths, so a run meets few (batch, length) shapes (the first step on each new one
        # cost about a step on an H100, and a recompile under torch.compile); on CPU padding is waste.
        "pad_to_multiple_of": GPU_PAD_MULTIPLE if on_gpu else None,
        "use_liger_kernel": plan.kernels == "liger",  # the Trainer patches the model with Liger's kernels
        "torch_compile": plan.kernels == "compile",
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
            # Each process writes its own shard of a checkpoint (torch.distributed.checkpoint): nothing
            # is gathered to rank 0 every save_steps; the adapter is gathered once, at the end.
            "state_dict_type": "SHARDED_STATE_DICT",
            "activation_checkpointing": plan.gradient_checkpointing,
            # Every process has loaded the base before the Trainer starts the process group, so rank-0
            # loading would only move the weights to meta and broadcast rank 0's copy; its re-tie on
            # meta fails for tied embeddings trained in full ("attribute 'weight' already exists").
            "cpu_ram_efficient_loading": False,
        }
    return args


def sft_config(cfg: Config, plan: Any, ckpt_dir: Path, world: int, cpu_count: int) -> Any:
    """The trl.SFTConfig: every field that matters set from params and the device plan, none left to defaults."""
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
        # data: tokenized by train/data.py (labels on the assistant turns only, cut to max_length), so
        # TRL's own preparation is skipped; no packing (padding_free needs flash-attn)
        max_length=t.max_length,
        dataset_kwargs={"skip_prepare_dataset": True},
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
        report_to="none",  # MLflow through tasks.plumbing.tracking, one run per training
        # Across nodes, a peer lost mid-collective must not hold a worker for torch's 30 minutes: the
        # agents restart the group or give up within the rendezvous timeout (distributed.py).
        ddp_timeout=max(600, t.rdzv_timeout_s) if t.nnodes > 1 else 1800,
        disable_tqdm=not sys.stderr.isatty(),  # progress bars garble non-TTY logs (Airflow)
        **device_args(plan, world, t.distributed, cpu_count),
    )


class ProcessesMixin:
    """The Trainer's data order and sharding across processes: the seeded, global-batch sampler, the
    epoch it is set to on a resumed run, and FSDP where accelerate does not enable it (CPU)."""

    _qa_sampler: EpochSampler | None = None
    _qa_group_by_length = False

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and self.args.use_cpu and not self.is_fsdp_enabled:
            shard_on_cpu(self)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        data = train_dataset if train_dataset is not None else self.train_dataset
        a = self.args
        global_batch = a.per_device_train_batch_size * a.gradient_accumulation_steps * max(1, a.world_size)
        lengths = sequence_lengths(data) if self._qa_group_by_length else None
        self._qa_sampler = EpochSampler(len(data), a.seed, global_batch, lengths)
        return self._qa_sampler

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # A run of several processes resumed after its first epoch iterates a SkipBatchSampler over
        # a BatchSamplerShard over the sampler, one level deeper than accelerate's set_epoch reaches:
        # it replayed the first epoch's order (resumed != uninterrupted). Set the epoch here.
        if self._qa_sampler is not None:
            self._qa_sampler.set_epoch(kwargs["epoch"] if "epoch" in kwargs else args[1])
        return super()._run_epoch(*args, **kwargs)


def trainer_class() -> type:
    """SFTTrainer with ProcessesMixin (sampler, resumed epochs, FSDP on CPU), where it is faster the
    model's own loss instead of TRL's fused LM head, and two per-step parameter walks done once.

    Extra constructor keywords: `group_by_length` (bool) and `plain_loss` (bool, for CPUs).
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class QATrainer(ProcessesMixin, SFTTrainer):
        def __init__(
            self, *args: Any, group_by_length: bool, plain_loss: bool = False, **kwargs: Any
        ) -> None:
            self._qa_group_by_length = group_by_length
            self._qa_plain_loss = plain_loss
            self._qa_flop_params: int | None = None
            self._qa_trainable: list[Any] | None = None
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

        def floating_point_ops(self, inputs: dict[str, Any]) -> int:
            # Trainer's count (6 x tokens x non-embedding parameters) walked all 347 modules of the tiny
            # base each step to count the parameters (1.7 ms of a ~150 ms CPU step): counted once here.
            main = getattr(self.model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(self.model, "num_parameters"):
                return 0
            if self._qa_flop_params is None:
                self._qa_flop_params = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main].numel() * self._qa_flop_params

        def _clip_grad_norm(self, model: Any) -> Any:
            # Only the trainable parameters have gradients (all of them: +1.1 ms a step on CPU, figure 1b);
            # FSDP and DeepSpeed clip their own way.
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:
                return super()._clip_grad_norm(model)
            if self._qa_trainable is None:
                self._qa_trainable = [p for p in model.parameters() if p.requires_grad]
            return self.accelerator.clip_grad_norm_(self._qa_trainable, self.args.max_grad_norm)

    return QATrainer


def shard_on_cpu(trainer: Any) -> None:
    """FSDP across CPU processes: accelerate's own FSDP2 path, entered where accelerate does not enter it.

    accelerate sets its FSDP distributed type only for GPU-like multi-device types (accelerate/state.py),
    so on CPU `train.distributed: fsdp` would train every process unsharded, as DDP. torch's
    `fully_shard` runs on CPU with gloo: this sets the distributed type (on PartialState too, which
    every later AcceleratorState() copies it from) and the Trainer's FSDP plugin, as accelerate does on
    a GPU node. What follows is accelerate's and the Trainer's FSDP code: wrapping, sharded
    checkpoints, resume. A GPU run never comes here (accelerate enabled FSDP itself).
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return  # left to build_trainer's check: a library change must not train unsharded silently
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
