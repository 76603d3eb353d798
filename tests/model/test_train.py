"""The train stage: real TRL + PEFT training of the tiny base, shrunk to a few steps.

One uninterrupted 12-step run (module fixture) is the reference for: eval loss goes down, the summary
adds up, a re-run is a no-op, a run killed with SIGKILL after a checkpoint resumes (not from step 0)
and ends where the reference ends, and 2 CPU processes (DDP over gloo, half the per-device batch)
follow the same loss curve. Bad params are refused before any step runs.

Portable: the expected device plan is derived from the capabilities detected on the machine running
the test (`QA_LORA_CPU_BF16=0|1` forces a CPU's bf16 capability, so both precisions can be run anywhere).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from small_lora import small_lora_overrides

from tasks.core.config import REPO_ROOT, load_config
from tasks.core.errors import UserError

TRAIN_ROWS, EVAL_ROWS = 96, 32
# 96 rows / global batch 8 = 12 steps = exactly one epoch: every row is seen once, so the tokens the
# trainer counts can be checked against the tokenizer.
TINY: list[str | tuple[str, object]] = [
    *small_lora_overrides(),  # the adapter the parameter counts below assume (its dropout is set below)
    "train.max_steps=12",
    "train.per_device_train_batch_size=8",
    "train.max_length=128",
    "train.logging_steps=2",
    "train.save_steps=4",
    "train.save_total_limit=5",
    "train.learning_rate=0.003",
    "train.warmup_ratio=0.0",
    "lora.dropout=0.0",  # dropout draws differ with the process layout; the comparisons need none
    "runtime.num_threads=1",  # the same kernels (and summation order) in every process layout
]
# Step losses of 2 gloo processes vs 1 process, same global batch: measured identical to 4 decimals.
DDP_LOSS_TOL = 2e-3
# Final adapter of a killed-and-resumed run vs the uninterrupted one (same seed and order).
RESUME_ATOL = 1e-5


def _expected_plan(cfg: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """The plan this machine must get, from its detected capabilities and the documented rules (auto:
    fp32 without native bf16; bf16 where the capability is forced on; measured where the device has
    native bf16 unforced; no gradient checkpointing for a model this small)."""
    from tasks.plumbing.device import detect_capabilities

    caps = detect_capabilities(cfg.runtime.device)
    if cfg.train.precision != "auto":
        precision = cfg.train.precision
    elif not caps.bf16_native:
        precision = "fp32"
    elif caps.bf16_forced:
        precision = "bf16"
    else:  # measured: both precisions timed, the verdict is one of them
        verdict = summary["precision_verdict"]
        assert set(verdict["rates"]) == {"fp32", "bf16"}, verdict
        precision = verdict["precision"]
    return {"backend": caps.backend, "precision": precision, "gradient_checkpointing": False}


def _write_split(run_dir: Path) -> None:
    """run_dir/data/{train,eval}.jsonl from the bundled dataset (or a synthetic one without it)."""
    source = REPO_ROOT / "data" / "qa.jsonl"
    if source.is_file():
        rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = rows[:: max(1, len(rows) // (TRAIN_ROWS + EVAL_ROWS))][: TRAIN_ROWS + EVAL_ROWS]
    else:
        rows = [
            {
                "id": f"s{i}",
                "question": f"What does function number {i} in module m{i % 7} return?",
                "answer": f"It returns the value {i * 3} as an integer.",
                "category": f"m{i % 7}",
            }
            for i in range(TRAIN_ROWS + EVAL_ROWS)
        ]
    assert len(rows) == TRAIN_ROWS + EVAL_ROWS
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:TRAIN_ROWS]), ("eval", rows[TRAIN_ROWS:])):
        text = "".join(json.dumps(r) + "\n" for r in part)
        (data / f"{name}.jsonl").write_text(text, encoding="utf-8")


def _overrides(tmp: Path, base: Path, *extra: str) -> list[str]:
    # The session fixture built the tiny base; the stage loads that directory as it is.
    return [
        *TINY,
        "base.kind=hub",
        f"base.name_or_path={base}",
        f"register.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        *extra,
    ]


def _adapter_tensors(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "train" / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted training; shared by the tests that compare against it."""
    from tasks.stages.train import train_adapter

    tmp = tmp_path_factory.mktemp("train-ref")
    run_dir = tmp / "run"
    _write_split(run_dir)
    cfg = load_config(overrides=_overrides(tmp, tiny_base))
    outer = time.perf_counter()
    result = train_adapter(cfg, run_dir)
    outer = time.perf_counter() - outer
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    return {
        "tmp": tmp,
        "base": tiny_base,
        "run_dir": run_dir,
        "cfg": cfg,
        "result": result,
        "summary": summary,
        "outer_seconds": outer,  # the call timed from outside the stage
    }


@pytest.mark.slow
def test_short_training_lowers_eval_loss_and_writes_the_adapter(reference: dict[str, Any]) -> None:
    result, summary, run_dir = reference["result"], reference["summary"], reference["run_dir"]
    assert result["status"] == "trained"
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    adapter = run_dir / "train" / "adapter"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (adapter / name).is_file(), name
    assert not (adapter / "training_args.bin").exists()  # no pickles in the artifact
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["r"] == reference["cfg"].lora.r
    assert not any(p.name.startswith(".tmp-") for p in (run_dir / "train").iterdir())
    # PEFT's card named the base by this machine's path: a local base is named by its directory only.
    from huggingface_hub import ModelCard

    card = (adapter / "README.md").read_text()
    base = reference["cfg"].base.name_or_path
    assert (
        ModelCard(card).data.base_model is None
        and base not in card
        and "qa-lora" in ModelCard(card).data.tags
    )


@pytest.mark.slow
def test_adapter_tokenizer_encodes_prompts_as_training_did(reference: dict[str, Any]) -> None:
    """Evaluate and export load the tokenizer saved beside the adapter (left padding, for generation);
    train loaded the base's (right padding). Both encode every eval prompt to the same ids, with the
    same pad and EOS, through the one loader."""
    from tasks.plumbing.chat import ChatFrame, chat_format
    from tasks.plumbing.loading import load_tokenizer

    cfg, adapter = reference["cfg"], reference["run_dir"] / "train" / "adapter"
    trained_with = load_tokenizer(cfg, padding_side="right")
    served_with = load_tokenizer(cfg, adapter, padding_side="left")
    rows = [
        json.loads(line) for line in (reference["run_dir"] / "data" / "eval.jsonl").read_text().splitlines()
    ]
    trained_chat, served_chat = chat_format(cfg, trained_with), chat_format(cfg, served_with)
    assert trained_chat.prompt_ids(rows) == served_chat.prompt_ids(rows)
    assert ChatFrame.load(adapter).fingerprint == trained_chat.fingerprint == served_chat.fingerprint
    assert (served_with.pad_token_id, served_with.eos_token_id) == (
        trained_with.pad_token_id,
        trained_with.eos_token_id,
    )
    assert served_with.pad_token_id != served_with.eos_token_id


@pytest.mark.slow
def test_summary_numbers_are_consistent(reference: dict[str, Any], tiny_base: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.plumbing.chat import chat_format
    from tasks.plumbing.loading import load_tokenizer

    s, cfg = reference["summary"], reference["cfg"]
    assert s["steps"] == s["max_steps"] == 12
    assert s["global_batch_size"] == 8
    assert s["epochs"] == pytest.approx(12 * 8 / TRAIN_ROWS)
    assert s["train_rows"] == TRAIN_ROWS and s["eval_rows"] == EVAL_ROWS
    # One full epoch: the trainer's non-pad token count equals the tokenizer's count of every row.
    chat = chat_format(cfg, load_tokenizer(cfg))
    rows = [
        json.loads(line) for line in (reference["run_dir"] / "data" / "train.jsonl").read_text().splitlines()
    ]
    expected = sum(len(ids) for ids, _ in chat.encode(rows))
    assert s["chat"]["fingerprint"] == chat.fingerprint and s["chat"]["end_of_turn"] == "</s>"
    assert s["tokens_seen"] == expected == s["tokens_seen_this_attempt"]
    # Times against a clock outside the stage: the steps are part of the stage's wall time, which is
    # part of the call's; so the step rate is at least the rate of the whole call.
    outer = reference["outer_seconds"]
    assert 0 < s["train_seconds"] < s["wall_seconds"] <= outer and s["train_runtime_seconds"] < outer
    assert s["tokens_seen"] / outer <= s["tokens_per_second"]
    # LoRA on q_proj and v_proj: r * (in + out) per module and layer, and what the adapter file holds.
    mc = AutoConfig.from_pretrained(tiny_base)
    kv = mc.hidden_size // mc.num_attention_heads * mc.num_key_value_heads
    lora = cfg.lora.r * ((mc.hidden_size + mc.hidden_size) + (mc.hidden_size + kv)) * mc.num_hidden_layers
    saved = sum(t.numel() for t in _adapter_tensors(reference["run_dir"]).values())
    assert s["trainable_params"] == lora == saved
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_base).parameters())
    assert s["total_params"] == base_params + lora
    assert 0 < s["trainable_share"] < 0.05
    # The plan this machine's capabilities imply, with a reason recorded for each decision.
    plan = _expected_plan(cfg, s)
    assert (s["precision"], s["gradient_checkpointing"], s["device"]["backend"]) == (
        plan["precision"],
        plan["gradient_checkpointing"],
        plan["backend"],
    )
    for decision in (
        f"precision={plan['precision']}:",
        "gradient_checkpointing=off:",
        "attn_implementation=",
    ):
        assert sum(r.startswith(decision) for r in s["plan_reasons"]) == 1, decision
    # Peak memory in bytes: the process held at least the base's weights, and no more than the machine has.
    weights = sum(f.stat().st_size for f in tiny_base.glob("*.safetensors"))
    assert weights <= s["peak_memory_bytes"] <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    steps = [h["step"] for h in s["loss_history"]]
    assert steps == list(range(2, 13, 2))
    assert s["final_train_loss"] == s["loss_history"][-1]["loss"]
    assert s["data"]["truncated_rows"] == 0
    assert s["resumed_from_step"] is None
    assert "sampler" in s["translations"]["group_by_length"]


@pytest.mark.slow
def test_training_is_tracked_in_one_mlflow_run(reference: dict[str, Any]) -> None:
    import mlflow

    from tasks.plumbing.tracking import setup_mlflow

    setup_mlflow(reference["cfg"])
    client = mlflow.MlflowClient()
    run = client.get_run(reference["summary"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == str(reference["cfg"].lora.r)
    assert (
        run.data.params["plan.precision"]
        == _expected_plan(reference["cfg"], reference["summary"])["precision"]
    )
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == list(range(2, 13, 2))
    assert client.get_metric_history(run.info.run_id, "tokens_per_second")
    assert len(client.get_metric_history(run.info.run_id, "eval_loss")) == 2  # before and after


@pytest.mark.slow
def test_rerun_of_a_finished_training_is_a_no_op(reference: dict[str, Any]) -> None:
    from tasks.stages.train import train_adapter

    train_dir = reference["run_dir"] / "train"
    watched = [train_dir / "train_summary.json", train_dir / "adapter" / "adapter_model.safetensors"]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in watched]
    checkpoints = sorted(p.name for p in (train_dir / "checkpoints").iterdir())
    result = train_adapter(reference["cfg"], reference["run_dir"])
    assert result["status"] == "reused"
    assert result["mlflow_run_id"] == reference["result"]["mlflow_run_id"]
    # Nothing was rewritten: no training happened.
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in watched] == before
    assert sorted(p.name for p in (train_dir / "checkpoints").iterdir()) == checkpoints


@pytest.mark.slow
def test_resume_after_kill_continues_from_the_checkpoint(reference: dict[str, Any], tmp_path: Path) -> None:
    """SIGKILL the training after a checkpoint; the re-run resumes it (not from step 0) and ends where
    the uninterrupted reference ends."""
    from tasks.stages.train import train_adapter
    from tasks.stages.train.checkpoints import is_complete

    run_dir = tmp_path / "run"
    _write_split(run_dir)
    # the same params (and MLflow store) as the reference
    overrides = _overrides(reference["tmp"], reference["base"])
    # The worker SIGKILLs itself at the end of step 6, two steps after checkpoint-4: a deterministic
    # point for a real kill -9 (no Python cleanup runs), whatever the machine's speed.
    code = (
        "import json, os, signal, sys\n"
        "from pathlib import Path\n"
        "from transformers import TrainerCallback\n"
        "from tasks.core.config import load_config\n"
        "from tasks.stages.train import train_adapter\n"
        "class Kill(TrainerCallback):\n"
        "    def on_step_end(self, args, state, control, **kw):\n"
        "        if state.global_step == 6: os.kill(os.getpid(), signal.SIGKILL)\n"
        "cfg = load_config(overrides=json.loads(sys.argv[1]))\n"
        "train_adapter(cfg, Path(sys.argv[2]), callbacks=[Kill()])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(overrides), str(run_dir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    ckpt_dir = run_dir / "train" / "checkpoints"
    assert not (run_dir / "train" / "train_summary.json").exists()
    complete = sorted(int(p.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*") if is_complete(p))
    assert complete == [4]
    # A checkpoint cut short while being written (no trainer_state.json) must be ignored.
    half = ckpt_dir / "checkpoint-11"
    half.mkdir(exist_ok=True)
    (half / "adapter_config.json").write_text("{}")
    state = json.loads((ckpt_dir / "qa_lora_state.json").read_text())

    result = train_adapter(load_config(overrides=overrides), run_dir)

    assert result["status"] == "resumed"
    assert result["resumed_from_step"] == complete[-1]
    assert not half.exists()
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    ref = reference["summary"]
    assert summary["steps"] == 12
    assert summary["mlflow_run_id"] == state["mlflow_run_id"]  # the same MLflow run, continued
    assert summary["eval_loss_before"] == state["eval_loss_before"]
    # Only the steps after the checkpoint were trained in the second attempt...
    assert summary["tokens_seen_this_attempt"] < summary["tokens_seen"] == ref["tokens_seen"]
    # ...and the loss curve and the adapter are those of the uninterrupted run.
    mine = {h["step"]: h["loss"] for h in summary["loss_history"]}
    for h in ref["loss_history"]:
        assert mine[h["step"]] == pytest.approx(h["loss"], abs=1e-4), h["step"]
    theirs = _adapter_tensors(reference["run_dir"])
    resumed = _adapter_tensors(run_dir)
    assert resumed.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert (resumed[name] - tensor).abs().max().item() <= RESUME_ATOL, name


@pytest.mark.slow
def test_two_cpu_processes_match_one(reference: dict[str, Any], tmp_path: Path) -> None:
    """DDP over gloo with half the per-device batch: the same global batches, the same losses."""
    from tasks.stages.train import train_adapter

    run_dir = tmp_path / "run"
    _write_split(run_dir)
    cfg = load_config(
        overrides=_overrides(
            tmp_path, reference["base"], "train.num_processes=2", "train.per_device_train_batch_size=4"
        )
    )
    result = train_adapter(cfg, run_dir)
    summary = json.loads(Path(result["summary"]).read_text())
    ref = reference["summary"]
    assert summary["processes"] == 2 and summary["distributed"] == "ddp"
    assert summary["global_batch_size"] == ref["global_batch_size"]
    assert summary["tokens_seen"] == ref["tokens_seen"]  # the very same samples were trained
    assert [h["step"] for h in summary["loss_history"]] == [h["step"] for h in ref["loss_history"]]
    for mine, theirs in zip(summary["loss_history"], ref["loss_history"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=DDP_LOSS_TOL), mine["step"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (run_dir / "train" / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------- checks before training


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.target_modules=[q_proj, qkv_proj]", "'qkv_proj' matches no module"),
        ("lora.target_modules=[layers]", "LoRA cannot adapt"),
        ("lora.modules_to_save=[embeddings]", "'embeddings' matches no module with weights"),
        ("train.max_length=4096", "exceeds the base model's max_position_embeddings"),
    ],
)
def test_bad_params_for_the_model_fail_before_training(
    tiny_base: Path, tmp_path: Path, override: str, message: str
) -> None:
    from tasks.stages.train import train_adapter

    _write_split(tmp_path)
    cfg = load_config(overrides=[*_overrides(tmp_path, tiny_base), override])
    with pytest.raises(UserError, match=message):
        train_adapter(cfg, tmp_path)
    assert not (tmp_path / "train").exists()  # nothing started: no checkpoint dir, no MLflow run


@pytest.mark.parametrize("override", ["lora.r=0", "train.learning_rate=0", "train.learning_rate=-1e-3"])
def test_out_of_range_params_are_refused_by_the_config(override: str) -> None:
    with pytest.raises(UserError, match=override.split("=")[0]):
        load_config(overrides=[override])


def test_missing_base_or_pickle_only_weights_fail_before_training(tmp_path: Path) -> None:
    from tasks.stages.train import train_adapter

    _write_split(tmp_path)
    missing = load_config(overrides=_overrides(tmp_path, tmp_path / "nope"))
    with pytest.raises(UserError, match="does not exist"):
        train_adapter(missing, tmp_path)

    pickled = tmp_path / "pickled-base"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "llama"}')
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    cfg = load_config(overrides=_overrides(tmp_path, pickled))
    with pytest.raises(UserError, match=r"no \*\.safetensors weights, only pickle files"):
        train_adapter(cfg, tmp_path)
    assert not (tmp_path / "train").exists()


def test_missing_split_is_a_user_error(tmp_path: Path) -> None:
    from tasks.stages.train import train_adapter

    with pytest.raises(UserError, match=r"train\.jsonl: split file not found"):
        train_adapter(load_config(overrides=_overrides(tmp_path, tmp_path)), tmp_path)


# ------------------------------------------------------------------ data, collation, checkpoints


def test_collated_batch_masks_the_prompt_and_trains_one_eos(tiny_base: Path, tmp_path: Path) -> None:
    """The tokenized split through TRL's collator: prompt labels -100, the end-of-turn token (EOS for the
    tiny base's template) trained exactly once at the end, padding is <pad> (not EOS) with label -100.
    The ids trained on are exactly the prompt ids evaluate and export generate from, then the answer's."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.plumbing.chat import chat_format
    from tasks.plumbing.device import DeviceCaps, plan_device
    from tasks.plumbing.loading import load_tokenizer
    from tasks.stages.train.data import check_collation, tokenized_split
    from tasks.stages.train.trainer import sft_config, trainer_class

    cfg = load_config(overrides=_overrides(tmp_path, tiny_base))
    tok = load_tokenizer(cfg, padding_side="right")
    chat = chat_format(cfg, tok)
    assert tok.pad_token_id != tok.eos_token_id and chat.stop_token_ids == (tok.eos_token_id,)
    rows = [
        {"id": "a", "question": "What is x?", "answer": "A letter.", "category": "c"},
        {
            "id": "b",
            "question": "What does os.path.join do with many parts?",
            "answer": "It joins them with the separator.",
            "category": "c",
        },
    ]
    split = tmp_path / "train.jsonl"
    split.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = tokenized_split(chat, split, tmp_path / "tokenized", cfg.train.max_length)
    plan = plan_device(DeviceCaps(backend="cpu", torch_version=torch.__version__))
    args = sft_config(cfg, plan, tmp_path / "ckpt", world=1, cpu_count=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        group_by_length=True,
        plain_loss=True,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    served = chat_format(cfg, load_tokenizer(cfg))  # evaluate's and export's: left padding, for generation
    for row in range(2):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        n = int(mask.sum())
        prompt_ids = served.prompt_ids([rows[row]])[0]
        prompt_len = len(prompt_ids)
        assert ids[:prompt_len].tolist() == prompt_ids
        answer = tok(
            served.answer_prefix + rows[row]["answer"] + served.answer_suffix, add_special_tokens=False
        )
        assert ids[prompt_len:n].tolist() == answer["input_ids"]
        assert (labels[:prompt_len] == -100).all()
        assert (labels[prompt_len:n] == ids[prompt_len:n]).all()
        assert int(ids[n - 1]) == tok.eos_token_id and int((labels == tok.eos_token_id).sum()) == 1
        assert (ids[n:] == tok.pad_token_id).all() and (labels[n:] == -100).all()
        assert int(ids[0]) == tok.bos_token_id
    assert check_collation(trainer, chat)["truncated_rows"] == 0
    # Tokenized once: a second call maps the same Arrow files instead of tokenizing again.
    again = tokenized_split(chat, split, tmp_path / "tokenized", cfg.train.max_length)
    assert again.cache_files == data.cache_files and again["input_ids"] == data["input_ids"]

    # The check fails loudly when padding would be a stop token.
    tok.pad_token = tok.eos_token
    trainer.data_collator.pad_token_id = tok.eos_token_id
    with pytest.raises(RuntimeError, match="is a stop token"):
        check_collation(trainer, chat)


def test_trainer_clips_the_trainable_gradients_and_counts_flops_as_transformers(
    tiny_base: Path, tmp_path: Path
) -> None:
    """The Trainer's per-step bookkeeping, taken out of its module walks (figure 1b), does the same
    work: the gradients the optimizer steps with are clipped to `max_grad_norm` (the logged norm is
    the one before clipping), and the FLOPs counted are transformers' own count."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTTrainer

    from tasks.plumbing.chat import chat_format
    from tasks.plumbing.device import DeviceCaps, plan_device
    from tasks.plumbing.loading import load_tokenizer
    from tasks.stages.train.data import tokenized_split
    from tasks.stages.train.model import lora_config
    from tasks.stages.train.trainer import sft_config, trainer_class

    _write_split(tmp_path)
    max_norm = 1e-3  # far below the gradients' norm: every step clips
    cfg = load_config(
        overrides=_overrides(tmp_path, tiny_base, "train.max_steps=3", f"train.max_grad_norm={max_norm}")
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), lora_config(cfg.lora))
    tokenizer = load_tokenizer(cfg, padding_side="right")
    data = tokenized_split(
        chat_format(cfg, tokenizer), tmp_path / "data" / "train.jsonl", tmp_path / "tok", 128
    )
    plan = plan_device(DeviceCaps(backend="cpu", torch_version=torch.__version__))
    args = sft_config(cfg, plan, tmp_path / "ckpt", world=1, cpu_count=1)
    args.logging_steps = 1
    stepped: list[tuple[float, bool]] = []

    class Norms(TrainerCallback):
        def on_pre_optimizer_step(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            frozen_grads = any(p.grad is not None for p in model.parameters() if not p.requires_grad)
            stepped.append(
                (float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))), frozen_grads)
            )

    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        group_by_length=True,
        plain_loss=True,
        callbacks=[Norms()],
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    expected_flops = SFTTrainer.floating_point_ops(trainer, batch)
    assert expected_flops > 0
    assert trainer.floating_point_ops(batch) == trainer.floating_point_ops(batch) == expected_flops
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(stepped) == len(logged) == 3
    for (clipped, frozen_grads), before in zip(stepped, logged, strict=True):
        assert before > 10 * max_norm  # the norm before clipping, as transformers logs it
        assert clipped == pytest.approx(max_norm, rel=1e-3)
        assert not frozen_grads


def test_length_grouped_sampler_is_seeded_complete_and_process_invariant() -> None:
    from tasks.stages.train.data import EpochSampler

    rng = __import__("random").Random(0)
    lengths = [rng.randint(10, 200) for _ in range(1000)]
    sampler = EpochSampler(len(lengths), seed=7, global_batch=16, lengths=lengths)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(1000))  # a permutation: every row once per epoch
    assert list(EpochSampler(len(lengths), 7, 16, lengths)) == epoch0  # seeded: a resume replays it
    sampler.set_epoch(1)
    assert list(sampler) != epoch0  # a new order each epoch

    def padding(order: list[int]) -> int:
        batches = [order[i : i + 16] for i in range(0, len(order), 16)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    shuffled = list(EpochSampler(len(lengths), 7, 16, None))
    assert padding(epoch0) < 0.2 * padding(shuffled)  # grouping removes most of the padding
    # The longest batch first: an out-of-memory shows at step 1.
    assert max(lengths[i] for i in epoch0[:16]) == max(lengths)


def test_incomplete_checkpoints_are_not_resumed(tmp_path: Path) -> None:
    from tasks.stages.train.checkpoints import is_complete, latest_complete_checkpoint

    def checkpoint(step: int, files: tuple[str, ...], state: bool = True) -> Path:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        for name in files:
            (path / name).write_bytes(b"x")
        if state:
            (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        return path

    full = (
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
    )
    good = checkpoint(4, full)
    no_state = checkpoint(8, full, state=False)  # killed before trainer_state.json was written
    no_optimizer = checkpoint(12, tuple(f for f in full if f != "optimizer.pt"))
    (tmp_path / "checkpoint-16").mkdir()
    (tmp_path / "checkpoint-16" / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    assert is_complete(good)
    assert not is_complete(no_state) and not is_complete(no_optimizer)
    assert latest_complete_checkpoint(tmp_path) == good


def test_a_sharded_checkpoint_is_complete_once_every_shard_is_indexed(tmp_path: Path) -> None:
    """FSDP writes each rank's shard of the weights and the optimizer (torch.distributed.checkpoint);
    rank 0 writes `.metadata` last, once every shard is on disk: a folder without it was cut short."""
    from tasks.stages.train.checkpoints import is_complete, latest_complete_checkpoint

    def checkpoint(step: int, indexed: tuple[str, ...]) -> Path:
        path = tmp_path / f"checkpoint-{step}"
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            (path / part).mkdir(parents=True)
            (path / part / "__0_0.distcp").write_bytes(b"x")
            if part in indexed:
                (path / part / ".metadata").write_bytes(b"x")
        for name in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
            (path / name).write_bytes(b"x")
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        return path

    good = checkpoint(10, ("pytorch_model_fsdp_0", "optimizer_0"))
    weights_cut = checkpoint(20, ("optimizer_0",))
    optimizer_cut = checkpoint(30, ("pytorch_model_fsdp_0",))
    assert is_complete(good)
    assert not is_complete(weights_cut) and not is_complete(optimizer_cut)
    assert latest_complete_checkpoint(tmp_path) == good
