"""The train stage: real TRL + PEFT training of the tiny base, shrunk to a few steps.

One uninterrupted 12-step run (module fixture) is the reference for: eval loss goes down, the summary
adds up, a re-run is a no-op, a run killed with SIGKILL after a checkpoint resumes (not from step 0)
and ends where the reference ends, and 2 CPU processes (DDP over gloo, half the per-device batch)
follow the same loss curve. Bad params are refused before any step runs.
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

from tasks.core.config import REPO_ROOT, load_config
from tasks.core.errors import UserError

TRAIN_ROWS, EVAL_ROWS = 96, 32
# 96 rows / global batch 8 = 12 steps = exactly one epoch: every row is seen once, so the tokens the
# trainer counts can be checked against the tokenizer.
TINY = [
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
# Final adapter of a killed-and-resumed run vs the uninterrupted one (fp32, same seed and order).
RESUME_ATOL = 1e-5


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
    result = train_adapter(cfg, run_dir)
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    return {
        "tmp": tmp,
        "base": tiny_base,
        "run_dir": run_dir,
        "cfg": cfg,
        "result": result,
        "summary": summary,
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


@pytest.mark.slow
def test_summary_numbers_are_consistent(reference: dict[str, Any], tiny_base: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from tasks.plumbing.prompting import format_completion, format_prompt

    s, cfg = reference["summary"], reference["cfg"]
    assert s["steps"] == s["max_steps"] == 12
    assert s["global_batch_size"] == 8
    assert s["epochs"] == pytest.approx(12 * 8 / TRAIN_ROWS)
    assert s["train_rows"] == TRAIN_ROWS and s["eval_rows"] == EVAL_ROWS
    # One full epoch: the trainer's non-pad token count equals the tokenizer's count of every row.
    tok = AutoTokenizer.from_pretrained(tiny_base)
    rows = [
        json.loads(line) for line in (reference["run_dir"] / "data" / "train.jsonl").read_text().splitlines()
    ]
    expected = sum(
        len(tok(format_prompt(r["question"]) + format_completion(r["answer"]))["input_ids"]) for r in rows
    )
    assert s["tokens_seen"] == expected == s["tokens_seen_this_attempt"]
    assert s["tokens_per_second"] == pytest.approx(s["tokens_seen"] / s["train_seconds"])
    assert 0 < s["train_seconds"] < s["wall_seconds"] and s["train_runtime_seconds"] < s["wall_seconds"]
    # LoRA on q_proj and v_proj: r * (in + out) per module and layer.
    mc = AutoConfig.from_pretrained(tiny_base)
    kv = mc.hidden_size // mc.num_attention_heads * mc.num_key_value_heads
    lora = cfg.lora.r * ((mc.hidden_size + mc.hidden_size) + (mc.hidden_size + kv)) * mc.num_hidden_layers
    assert s["trainable_params"] == lora
    assert s["trainable_share"] == pytest.approx(lora / s["total_params"])
    assert 0 < s["trainable_share"] < 0.05
    # The plan on this CPU, recorded with reasons.
    assert (s["precision"], s["gradient_checkpointing"], s["device"]["backend"]) == ("fp32", False, "cpu")
    assert len(s["plan_reasons"]) >= 3
    assert s["peak_memory_bytes"] > 0
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
    assert run.data.params["plan.precision"] == "fp32"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == list(range(2, 13, 2))
    assert client.get_metric_history(run.info.run_id, "tokens_per_second")
    assert len(client.get_metric_history(run.info.run_id, "eval_loss")) == 2  # before and after


@pytest.mark.slow
def test_rerun_of_a_finished_training_is_a_no_op(reference: dict[str, Any]) -> None:
    from tasks.stages.train import train_adapter

    summary_path = reference["run_dir"] / "train" / "train_summary.json"
    before = (summary_path.read_bytes(), summary_path.stat().st_mtime_ns)
    started = time.perf_counter()
    result = train_adapter(reference["cfg"], reference["run_dir"])
    assert result["status"] == "reused"
    assert result["mlflow_run_id"] == reference["result"]["mlflow_run_id"]
    assert (summary_path.read_bytes(), summary_path.stat().st_mtime_ns) == before
    assert time.perf_counter() - started < 30  # no training happened (loose: a shared CI CPU)


@pytest.mark.slow
def test_resume_after_kill_continues_from_the_checkpoint(reference: dict[str, Any], tmp_path: Path) -> None:
    """SIGKILL the training after a checkpoint; the re-run resumes it (not from step 0) and ends where
    the uninterrupted reference ends."""
    from tasks.stages.train.stage import _is_complete, train_adapter

    run_dir = tmp_path / "run"
    _write_split(run_dir)
    # the same params (and MLflow store) as the reference
    overrides = _overrides(reference["tmp"], reference["base"])
    # The worker SIGKILLs itself at the end of step 6, two steps after checkpoint-4: a deterministic
    # point for a real kill -9 (no Python cleanup runs), whatever the machine's speed.
    code = (
        "import json, os, signal, sys; from pathlib import Path; import tasks.stages.train.stage as T\n"
        "from tasks.core.config import load_config\n"
        "make = T._reporter\n"
        "def crashing(*a, **k):\n"
        "    r = make(*a, **k)\n"
        "    def on_step_end(args, state, control, **kw):\n"
        "        if state.global_step == 6: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    r.on_step_end = on_step_end\n"
        "    return r\n"
        "T._reporter = crashing\n"
        "T.train_adapter(load_config(overrides=json.loads(sys.argv[1])), Path(sys.argv[2]))\n"
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
    complete = sorted(int(p.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*") if _is_complete(p))
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
    """TRL's prompt/completion path with our template: prompt labels -100, EOS trained exactly once
    at the end (TRL adds no second one), padding is <pad> (not EOS) with label -100."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from tasks.plumbing.device import plan_device
    from tasks.stages.train.stage import (
        _Base,
        _check_collation,
        _load_tokenizer,
        _prompt_completion,
        _sft_config,
    )

    cfg = load_config(overrides=_overrides(tmp_path, tiny_base))
    tok, note = _load_tokenizer(cfg, _Base(str(tiny_base), local=True))
    assert note is None and tok.pad_token_id != tok.eos_token_id
    rows = [
        {"id": "a", "question": "What is x?", "answer": "A letter."},
        {
            "id": "b",
            "question": "What does os.path.join do with many parts?",
            "answer": "It joins them with the separator.",
        },
    ]
    from tasks.plumbing.device import DeviceCaps

    plan = plan_device(DeviceCaps(backend="cpu", torch_version=torch.__version__))
    args = _sft_config(cfg, plan, tmp_path / "ckpt", world=1, cpu_count=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_prompt_completion(rows), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row in range(2):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        n = int(mask.sum())
        prompt_len = len(tok(f"[INST] {rows[row]['question']} [/INST]")["input_ids"])
        assert (labels[:prompt_len] == -100).all()
        assert (labels[prompt_len:n] == ids[prompt_len:n]).all()
        assert int(ids[n - 1]) == tok.eos_token_id and int((labels == tok.eos_token_id).sum()) == 1
        assert (ids[n:] == tok.pad_token_id).all() and (labels[n:] == -100).all()
        assert int(ids[0]) == tok.bos_token_id
    assert _check_collation(trainer, tok)["truncated_rows"] == 0

    # The check fails loudly when padding would be EOS.
    tok.pad_token = tok.eos_token
    trainer.data_collator.pad_token_id = tok.eos_token_id
    with pytest.raises(RuntimeError, match="equals EOS"):
        _check_collation(trainer, tok)


def test_length_grouped_sampler_is_seeded_complete_and_process_invariant() -> None:
    from tasks.stages.train.stage import _EpochSampler

    rng = __import__("random").Random(0)
    lengths = [rng.randint(10, 200) for _ in range(1000)]
    sampler = _EpochSampler(len(lengths), seed=7, global_batch=16, lengths=lengths)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(1000))  # a permutation: every row once per epoch
    assert list(_EpochSampler(len(lengths), 7, 16, lengths)) == epoch0  # seeded: a resume replays it
    sampler.set_epoch(1)
    assert list(sampler) != epoch0  # a new order each epoch

    def padding(order: list[int]) -> int:
        batches = [order[i : i + 16] for i in range(0, len(order), 16)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    shuffled = list(_EpochSampler(len(lengths), 7, 16, None))
    assert padding(epoch0) < 0.2 * padding(shuffled)  # grouping removes most of the padding
    # The longest batch first: an out-of-memory shows at step 1.
    assert max(lengths[i] for i in epoch0[:16]) == max(lengths)


def test_incomplete_checkpoints_are_not_resumed(tmp_path: Path) -> None:
    from tasks.stages.train.stage import _is_complete, _latest_complete_checkpoint

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
    assert _is_complete(good)
    assert not _is_complete(no_state) and not _is_complete(no_optimizer)
    assert _latest_complete_checkpoint(tmp_path) == good
