"""Figures 1 and 2: training throughput (non-pad tokens/s) and hardware efficiency (MFU).

Trainings on the tiny base (the first three with the same LoRA, params.yaml `lora`, and batch size):

* stage: `tasks.stages.train.train_adapter` itself (TRL SFTTrainer with the device plan, length-grouped
  sampler, prompt/completion data). Per-step times come from a Trainer callback passed to the stage
  (its public `callbacks=` argument), and its batches are recorded by a forward pre-hook, so nothing
  else changes.
* bare: a plain PyTorch + PEFT step (forward, backward, clip, AdamW) on *the batch the stage just
  trained on*, run right after each stage step (its time kept out of the stage's): the ceiling
  without trainer overhead, measured under the same machine load (the CPU here is shared).
* naive: the reference walkthrough ported as is to TRL 1.x: its `text` format
  ("<s>[INST] q [/INST] a </s>", loss on every token) and SFTConfig's defaults (bf16 autocast,
  gradient checkpointing, padding to the longest row, random order, fused AdamW); only `use_cpu`,
  the batch size and the LoRA settings are set (to the stage's, so that the ratio is not a batch-size
  effect).
* naive, walkthrough settings: the same port with the walkthrough's own batch size and LoRA
  (batch 4, r=64, alpha 16, dropout 0.1, from params/llama2-7b-mi300x.yaml), as a user porting it
  would run it: what the stage's defaults and engineering together buy over that port.

Tokens/s count non-pad tokens (prompt included) of the measured steps, after warm-up steps; the
measured steps are split into blocks and the median block rate is reported. The naive run is paired
with bare steps too (on the stage's batches), and stage-vs-naive is reported both raw and with each
side divided by the bare rate measured beside it (the machine's speed at that moment).

MFU: useful FLOPs per non-pad token (LoRA: frozen weights need no weight gradient)
    4 * N_frozen_matmul + 2 * N_full_matmul + 6 * N_lora + 12 * L * d * T
(forward 2N, input-gradient 2N for every base weight; the weight gradient 2N more for those that
`lora.modules_to_save` trains in full; 6N for LoRA weights; attention scores and values forward +
backward with T the mean sequence length, PaLM's convention), where N_frozen_matmul counts every base
weight used in a matmul (the tied LM head included, embeddings lookups not) and N_full_matmul those
of them trained in full (the tied LM head when the embeddings are). The common convention
6 * N_params is reported too. Divided by torch.matmul fp32 FLOP/s on
square matrices measured in the same run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.common import bench_config, loadavg, median, ratio, write_split
from tasks.core.config import REPO_ROOT, load_config
from tasks.stages.train import train_adapter
from tasks.stages.train.model import lora_config

log = logging.getLogger("qa_lora.bench")


def run(tmp: Path, quick: bool, device: str = "cpu") -> dict[str, Any]:
    """Figures 1 and 2 on the tiny base (CPU). Returns the JSON for results.json.

    Also leaves a trained run dir (`run_dir`) that the inference figure exports and reuses.
    """
    warmup, steps, blocks = (2, 12, 3) if quick else (4, 24, 3)
    naive_steps = 3 if quick else 5  # slower per step: fewer steps, same block scheme
    run_dir = tmp / "runs" / "train-bench"
    split = write_split(run_dir)
    batch = 16
    cfg = bench_config(
        tmp,
        [
            ("train.max_steps", warmup + steps),
            ("train.per_device_train_batch_size", batch),
            ("train.save_steps", 10_000),  # no checkpoint inside the measured steps
            ("train.logging_steps", 10),
            ("runtime.device", device),
        ],
    )
    load_before = loadavg()
    stage = measure_stage(cfg, run_dir, warmup, blocks)
    batches = stage.pop("batches")
    attn = stage["attn_implementation"]
    naive = measure_naive(cfg, run_dir, batch, batches, attn, 1, naive_steps, blocks)
    # The walkthrough's own batch size and LoRA (params/llama2-7b-mi300x.yaml), as a user porting it
    # would run it: what switching from that port to the stage's defaults buys.
    walk = load_config(REPO_ROOT / "params" / "llama2-7b-mi300x.yaml")
    wb = walk.train.per_device_train_batch_size
    naive_walk = measure_naive(
        cfg, run_dir, wb, batches, attn, 2, naive_steps * max(1, batch // wb), blocks, lora=walk.lora
    )
    load_after = loadavg()
    figure1 = _figure1(stage, naive, naive_walk)
    figure1.update(batch_size=batch, split=split, load_before=load_before, load_after=load_after)
    from benchmarks import mfu  # it builds on this module's bare loop

    figure2 = mfu.figure2(cfg, stage, batches, quick)
    return {"figure1": figure1, "figure2": figure2, "run_dir": str(run_dir)}


def _figure1(stage: dict[str, Any], naive: dict[str, Any], naive_walk: dict[str, Any]) -> dict[str, Any]:
    """Stage vs bare vs naive TRL (raw, and each relative to the bare step beside it)."""
    s_rate, s_probe = stage["trainer"]["tokens_per_s"], stage["paired_bare"]["tokens_per_s"]
    n_rate, n_probe = naive["trainer"]["tokens_per_s"], naive["paired_bare"]["tokens_per_s"]
    return {
        "stage_tokens_per_s": s_rate,
        "bare_tokens_per_s": s_probe,
        "naive_tokens_per_s": n_rate,
        # same batches, each bare step right after the stage's step on it: median of per-step ratios
        "stage_vs_bare": stage["relative_to_bare"]["median"],
        "stage_vs_bare_sums": stage["paired_ratio"],
        "stage_vs_naive_raw": ratio(s_rate, n_rate),
        # each trainer step divided by the bare step beside it (the machine's speed at that moment)
        "stage_vs_naive": ratio(stage["relative_to_bare"]["median"], naive["relative_to_bare"]["median"]),
        "stage_vs_naive_blocks": ratio(ratio(s_rate, s_probe), ratio(n_rate, n_probe)),
        "stage_vs_walkthrough": ratio(
            stage["relative_to_bare"]["median"], naive_walk["relative_to_bare"]["median"]
        ),
        "walkthrough_tokens_per_s": naive_walk["trainer"]["tokens_per_s"],
        "stage": stage,
        "naive": naive,
        "naive_walkthrough": naive_walk,
    }


# ------------------------------------------------------------------------------------------ bare


class Bare:
    """A plain PyTorch + PEFT training step (forward, backward, clip, AdamW), timed per batch."""

    KEYS = ("input_ids", "attention_mask", "labels", "position_ids")

    def __init__(self, cfg: Any, attn: str, dtype: Any = None) -> None:
        import torch

        self.cfg = cfg
        self.model = _peft_model(cfg, attn, dtype)
        # bf16 weights: the stage trains them under bf16 autocast too (SFTConfig bf16=True)
        self.autocast = self.model.get_input_embeddings().weight.dtype == torch.bfloat16
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay
        )

    def step(self, batch: dict[str, Any]) -> float:
        import torch

        inputs = {
            k: batch[k].to(self.device) for k in self.KEYS if k in batch
        }  # re-batched rows live on the CPU
        _sync(self.cfg)
        t = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(**inputs, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.cfg)
        return time.perf_counter() - t


def _on_gpu(cfg: Any) -> bool:
    return cfg.runtime.device == "cuda"


def _sync(cfg: Any) -> None:
    if _on_gpu(cfg):
        import torch

        torch.cuda.synchronize()


def _peft_model(cfg: Any, attn: str, dtype: Any = None) -> Any:
    """The bare loop's model, in `dtype` (the stage's model's, when it is known)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    gpu = _on_gpu(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        str(cfg.resolve(cfg.base.name_or_path)),
        dtype=dtype or (torch.bfloat16 if gpu else torch.float32),
        attn_implementation=attn,
        device_map={"": 0} if gpu else None,
    )
    model.config.use_cache = False
    torch.manual_seed(cfg.train.seed)
    return get_peft_model(model, lora_config(cfg.lora))


class _Paired:
    """Callback body shared by the stage and the naive run: times each trainer step and runs one bare
    step right after it (its time excluded from the trainer's), so both see the same machine load.

    Paired with the trainer's own batches (`probe_batches` None), each (batch, length) shape the trainer
    meets for the first time is run once, untimed, by the bare loop just before the trainer's forward:
    the first step on a new shape costs more (oneDNN builds its bf16 kernels per shape: +13% a step
    here in bf16, +2.5% in fp32), and without this the trainer would always pay it and the bare step
    after it never. Both are then timed on shapes they have run, as most steps of a long run are.
    """

    def __init__(self, cfg: Any, attn: str, probe_batches: list[dict[str, Any]] | None) -> None:
        self.cfg, self.attn = cfg, attn
        self.probe_batches = probe_batches  # None: probe with the batch the trainer just used
        self.shapes_seen: set[tuple[int, ...]] = set()
        self.bare: Bare | None = None
        self.mark = 0.0
        self.trainer_times: list[float] = []
        self.bare_times: list[float] = []
        self.batches: list[dict[str, Any]] = []  # what the trainer's model was fed, per step
        self.probe_used: list[dict[str, Any]] = []
        self.handle: Any = None

    def _hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if module.training and "attention_mask" in kwargs:
            self.batches.append({k: v.detach().clone() for k, v in kwargs.items() if hasattr(v, "detach")})
            shape = tuple(kwargs["attention_mask"].shape)
            if self.probe_batches is None and self.bare is not None and shape not in self.shapes_seen:
                self.shapes_seen.add(shape)
                t = time.perf_counter()
                self.bare.step(self.batches[-1])  # untimed for both: see the class doc
                self.mark += time.perf_counter() - t

    def begin(self, model: Any) -> None:
        if self.bare is None:  # the same precision as the stage's model (its device plan's choice)
            self.bare = Bare(self.cfg, self.attn, model.get_input_embeddings().weight.dtype)
            self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)
            _sync(self.cfg)
            self.mark = time.perf_counter()

    def end(self) -> None:
        _sync(self.cfg)  # GPU work is asynchronous: the step is done when the device is
        now = time.perf_counter()
        self.trainer_times.append(now - self.mark)
        i = len(self.trainer_times) - 1
        probe = (
            self.batches[-1]
            if self.probe_batches is None
            else self.probe_batches[i % len(self.probe_batches)]
        )
        self.probe_used.append(probe)
        assert self.bare is not None
        self.bare_times.append(self.bare.step(probe))
        self.mark = time.perf_counter()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


# ----------------------------------------------------------------------------------------- stage


def measure_stage(cfg: Any, run_dir: Path, warmup: int, blocks: int, attn: str = "sdpa") -> dict[str, Any]:
    """Run the train stage unchanged; time its optimizer steps, each paired with a bare step.

    `attn` is the bare loop's attention; the stage's own choice is checked against it afterwards.
    """
    from transformers import TrainerCallback

    paired = _Paired(cfg, attn, None)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            paired.begin(model)

        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            paired.end()

    t = time.perf_counter()
    try:
        result = train_adapter(cfg, run_dir, callbacks=[StepTimer()])
    finally:
        paired.close()
    wall = time.perf_counter() - t
    summary = json.loads(Path(result["summary"]).read_text())
    attn = summary.get("attn_implementation", "sdpa")
    if summary.get("attn_implementation") != paired.attn:
        log.warning("the stage used %s attention, the bare loop %s", attn, paired.attn)
    if len(paired.trainer_times) != len(paired.batches):
        raise RuntimeError(f"stage: {len(paired.trainer_times)} steps but {len(paired.batches)} batches")
    trainer = block_rates(paired.batches, paired.trainer_times, warmup, blocks)
    bare = block_rates(paired.batches, paired.bare_times, warmup, blocks)
    return {
        "trainer": trainer,
        "paired_bare": bare,
        "relative_to_bare": _relative(
            paired.batches, paired.trainer_times, paired.batches, paired.bare_times, warmup
        ),
        "paired_ratio": ratio(sum(paired.bare_times[warmup:]), sum(paired.trainer_times[warmup:])),
        "trainer_step_s": [round(x, 5) for x in paired.trainer_times],
        "bare_step_s": [round(x, 5) for x in paired.bare_times],
        "steps": len(paired.trainer_times),
        "shapes_warmed": len(paired.shapes_seen),
        "warmup_steps": warmup,
        "stage_wall_s": round(wall, 2),
        "attn_implementation": attn,
        "precision": summary.get("precision"),
        "gradient_checkpointing": summary.get("gradient_checkpointing"),
        "batches": paired.batches,
    }


def _relative(
    batches: list[dict[str, Any]],
    times: list[float],
    probes: list[dict[str, Any]],
    bare: list[float],
    warmup: int,
) -> dict[str, Any]:
    """Per measured step: the trainer's tokens/s divided by the bare step's run right after it.

    Adjacent in time, the two see the same machine load, so the median of these ratios is the
    figure that survives the load swings of a shared machine (block rates here varied 15x).
    """
    rel = []
    for b, t, p, u in zip(batches[warmup:], times[warmup:], probes[warmup:], bare[warmup:], strict=True):
        rel.append((int(b["attention_mask"].sum()) / t) / (int(p["attention_mask"].sum()) / u))
    return {"median": median(rel), "per_step": [round(r, 3) for r in rel]}


def block_rates(
    batches: list[dict[str, Any]], times: list[float], warmup: int, blocks: int
) -> dict[str, Any]:
    """Non-pad tokens/s over the steps after warm-up, as the median of `blocks` consecutive blocks."""
    toks = [int(b["attention_mask"].sum()) for b in batches]
    padded = [int(b["attention_mask"].numel()) for b in batches]
    toks, padded, times = toks[warmup:], padded[warmup:], times[warmup:]
    size = max(1, len(times) // blocks)
    rates, block_padded = [], []
    for i in range(0, size * blocks, size):
        sl = slice(i, i + size)
        if not times[sl]:
            break
        rates.append(sum(toks[sl]) / sum(times[sl]))
        block_padded.append(sum(padded[sl]) / sum(times[sl]))
    lengths = [int(m) for b in batches for m in b["attention_mask"].sum(-1).tolist()]
    return {
        "tokens_per_s": median(rates),
        "block_tokens_per_s": [round(r, 1) for r in rates],
        "padded_tokens_per_s": median(block_padded),
        "overall_tokens_per_s": sum(toks) / max(sum(times), 1e-9),
        "measured_steps": len(times),
        "median_step_s": median(times),
        "pad_fraction": 1 - sum(toks) / max(1, sum(padded)),
        "mean_seq_len": sum(lengths) / max(1, len(lengths)),
    }


# ----------------------------------------------------------------------------------------- naive


def _naive_trainer(cfg: Any, run_dir: Path, batch: int, max_steps: int, lora: Any, paired: _Paired) -> Any:
    """The walkthrough's SFTTrainer on TRL 1.x defaults, each step timed by `paired`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    base = str(cfg.resolve(cfg.base.name_or_path))
    rows = [json.loads(line) for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()]
    data = Dataset.from_list(
        [{"text": f"<s>[INST] {r['question']} [/INST] {r['answer']} </s>"} for r in rows]
    )
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)  # the walkthrough: no dtype, no device given

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            paired.begin(model)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            paired.end()

    args = SFTConfig(
        output_dir=str(run_dir.parent / "naive-trl"),
        use_cpu=not _on_gpu(cfg),  # SFTConfig refuses to start on a machine without a GPU otherwise
        per_device_train_batch_size=batch,
        max_steps=max_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1000,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config(lora),
        callbacks=[Timer()],
    )


def measure_naive(
    cfg: Any,
    run_dir: Path,
    batch: int,
    probe_batches: list[dict[str, Any]],
    attn: str,
    warmup: int,
    steps: int,
    blocks: int,
    lora: Any = None,
) -> dict[str, Any]:
    """The walkthrough on TRL 1.x defaults (see the module docstring), paired with bare steps.

    `lora`: the naive trainer's LoRA settings (default: the stage's). The bare steps beside it always
    use the stage's settings on the stage's batches: one yardstick for both trainers.
    """
    lora = lora or cfg.lora
    paired = _Paired(cfg, attn, probe_batches)
    trainer = _naive_trainer(cfg, run_dir, batch, warmup + steps, lora, paired)
    args = trainer.args
    try:
        trainer.train()
    finally:
        paired.close()
    if len(paired.trainer_times) != len(paired.batches):
        raise RuntimeError(f"naive: {len(paired.trainer_times)} steps but {len(paired.batches)} batches")
    return {
        "trainer": block_rates(paired.batches, paired.trainer_times, warmup, blocks),
        "paired_bare": block_rates(paired.probe_used, paired.bare_times, warmup, blocks),
        "relative_to_bare": _relative(
            paired.batches, paired.trainer_times, paired.probe_used, paired.bare_times, warmup
        ),
        "steps": len(paired.trainer_times),
        "warmup_steps": warmup,
        "bf16": bool(args.bf16),
        "gradient_checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing", False)),
        "optim": str(getattr(args.optim, "value", args.optim)),
        "batch_size": batch,
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout},
        "padding_free": bool(args.padding_free),
        "packing": bool(args.packing),
        "text_format": "<s>[INST] {question} [/INST] {answer} </s> (loss on every token)",
    }
