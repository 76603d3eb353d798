"""FSDP across two CPU processes (gloo; FSDP2 `fully_shard` through accelerate and the Trainer), run by
`qa-lora train` as a user runs it: the weights are sharded, each rank writes its shard of every
checkpoint, the first steps' losses match a DDP run of the same global batch, a run killed with SIGKILL
resumes from its last complete sharded checkpoint to the uninterrupted run's adapter, and rank 0's
gathered adapter loads in plain PEFT, merges and exports with parity.

The adapter trains the tied embeddings in full, as params.yaml's default does: the case accelerate's
rank-0 loading broke (`KeyError: "attribute 'weight' already exists"` re-tying them on meta).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from small_lora import SMALL_LORA

from tasks.core.config import REPO_ROOT, load_config

pytestmark = pytest.mark.slow

QA_LORA = str(Path(sys.executable).with_name("qa-lora"))
# 128 rows at a global batch of 8: 16 steps an epoch. The kill comes after the checkpoint of step 20, in
# the second epoch (a resumed multi-process run replayed the first epoch's order there: trainer.py).
STEPS, SAVE, KILL_AFTER = 40, 10, 20
ADAPTER_ATOL = 1e-4  # fp32 on CPU; measured FSDP vs DDP 3.0e-5 (the embeddings), resumed vs not 0.0


def _params(root: Path, tiny_base: Path) -> Path:
    params = root / "params.yaml"
    doc = {
        "extends": str(REPO_ROOT / "params.yaml"),
        "base": {"name_or_path": str(tiny_base), "kind": "hub"},
        "lora": {**SMALL_LORA, "dropout": 0.0, "modules_to_save": ["embed_tokens"]},
        "train": {
            "max_steps": STEPS, "save_steps": SAVE, "save_total_limit": 10, "logging_steps": 5,
            "per_device_train_batch_size": 4, "max_length": 128, "learning_rate": 0.003, "warmup_ratio": 0.0,
            "precision": "fp32", "num_processes": 2, "distributed": "fsdp", "replay_ratio": 0.0,
        },
        "eval": {"max_rows": 16},
        "runtime": {"num_threads": 1},
        "register": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
    }  # fmt: skip
    params.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return params


def _run_dir(root: Path, name: str) -> Path:
    rows = [json.loads(line) for line in (REPO_ROOT / "data" / "qa.jsonl").read_text().splitlines()][:160]
    data = root / name / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:128]))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[128:]))
    return root / name


def _train(params: Path, run_dir: Path, *sets: str, wait: bool = True) -> subprocess.Popen[bytes]:
    command = [QA_LORA, "train", "--params", str(params), "--run-dir", str(run_dir)]
    command += [arg for value in sets for arg in ("--set", value)]
    env = {**os.environ, "QA_LORA_ROOT": str(REPO_ROOT)}
    log = run_dir / f"train-{len(list(run_dir.glob('train-*.log')))}.log"
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    if wait:
        assert process.wait(timeout=600) == 0, log.read_text(errors="replace")[-4000:]
    return process


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "train" / "train_summary.json").read_text())


def _adapter(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors")


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    params = _params(root, tiny_base)
    fsdp, ddp = _run_dir(root, "fsdp"), _run_dir(root, "ddp")
    _train(params, fsdp)
    _train(params, ddp, "train.distributed=ddp")
    return {"root": root, "params": params, "fsdp": fsdp, "ddp": ddp}


def test_fsdp_shards_the_model_and_trains_as_ddp_does(runs: dict[str, Path]) -> None:
    fsdp, ddp = _summary(runs["fsdp"]), _summary(runs["ddp"])
    assert (fsdp["distributed"], fsdp["processes"], fsdp["steps"]) == ("fsdp", 2, STEPS)
    # Sharded: rank 0 held half of every parameter (DDP: all of them).
    assert abs(fsdp["params_held_by_rank0"] / fsdp["total_params"] - 0.5) < 0.01
    assert ddp["params_held_by_rank0"] == ddp["total_params"]
    # Each rank wrote its shard of each checkpoint; nothing was gathered into one file.
    checkpoint = runs["fsdp"] / "train" / "checkpoints" / f"checkpoint-{SAVE}"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {p.name for p in (checkpoint / part).iterdir()} == {
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
        }
    assert not (checkpoint / "adapter_model.safetensors").exists()
    # The same global batch, the same losses (first steps: before any drift could add up).
    first, ddp_first = fsdp["loss_history"][:2], ddp["loss_history"][:2]
    assert [h["step"] for h in first] == [h["step"] for h in ddp_first] == [5, 10]
    assert [h["loss"] for h in first] == pytest.approx([h["loss"] for h in ddp_first], rel=1e-4)
    assert fsdp["eval_loss_after"] == pytest.approx(ddp["eval_loss_after"], rel=1e-4)
    assert fsdp["eval_loss_after"] < fsdp["eval_loss_before"]
    assert _max_diff(_adapter(runs["fsdp"]), _adapter(runs["ddp"])) < ADAPTER_ATOL


def test_a_killed_fsdp_run_resumes_from_its_last_sharded_checkpoint(runs: dict[str, Path]) -> None:
    import psutil

    run_dir = _run_dir(runs["root"], "killed")
    node = _train(runs["params"], run_dir, wait=False)
    state = run_dir / "train" / "checkpoints" / f"checkpoint-{KILL_AFTER}" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not state.is_file():
        assert time.monotonic() < deadline and node.poll() is None, "no checkpoint before the deadline"
        time.sleep(0.05)
    processes = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    for process in processes:  # kill -9 the stage, torchrun and both workers, as a lost machine
        process.kill()
    psutil.wait_procs(processes, timeout=30)
    assert not (run_dir / "train" / "train_summary.json").exists()

    _train(runs["params"], run_dir)
    summary = _summary(run_dir)
    assert KILL_AFTER <= summary["resumed_from_step"] < STEPS
    assert summary["steps"] == STEPS
    assert summary["eval_loss_after"] == pytest.approx(_summary(runs["fsdp"])["eval_loss_after"], rel=1e-4)
    assert _max_diff(_adapter(run_dir), _adapter(runs["fsdp"])) < ADAPTER_ATOL


def test_the_gathered_adapter_loads_in_plain_peft_merges_and_exports(
    runs: dict[str, Path], tiny_base: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.stages.export import export_model

    run_dir = runs["fsdp"]
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "train" / "adapter")
    trained = _adapter(run_dir)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    assert len(loaded) == len(trained) and all(v.abs().sum() > 0 for v in loaded.values())

    (run_dir / "eval").mkdir()
    gate = {"passed": True, "decision": "pass", "primary_metric": "token_f1", "reasons": []}
    (run_dir / "eval" / "gate.json").write_text(json.dumps(gate))
    cfg = load_config(
        REPO_ROOT / "params.yaml",
        overrides=[
            ("base.name_or_path", str(tiny_base)),
            ("register.tracking_uri", f"sqlite:///{runs['root'] / 'export-registry.db'}"),
            ("export.parity_prompts", 4),
            ("export.parity_new_tokens", 8),
            ("export.variants", []),
        ],
    )
    result = export_model(cfg, run_dir)
    parity = json.loads(Path(result["summary"]).read_text())["parity"]
    assert parity["merge"]["max_abs_diff"] <= cfg.export.merge_atol and parity["merge"]["tokens_identical"]
    assert parity["onnx"]["tokens_identical"] and parity["onnx"]["max_abs_diff"] <= cfg.export.logits_atol
