"""A real champion for serving tests: tiny base + a random (non-zero) LoRA -> export -> register -> champion.

Used by tests/model/test_pyfunc_model.py and tests/e2e/test_model_serving.py. The run directory is
structurally what the pipeline writes before `export` (adapter, eval rows, a passing gate, reports); the
export and the registration are the real stages, so the registered version is what production registers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.plumbing.chat import ChatFormat, ChatFrame, fingerprint_of

# Eval prompts of different lengths: the batch needs left padding.
QUESTIONS = [
    "What does zip() return?",
    "How do I open a file for reading and make sure it is closed afterwards?",
    "What is a list?",
    "Which keyword defines a function?",
]


def _run_dir(root: Path, base: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = root / "champion-run"
    for sub in ("data", "eval", "train"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora)
    model.save_pretrained(run / "train/adapter")
    tokenizer.save_pretrained(run / "train/adapter")
    ChatFormat(tokenizer).frame().save(run / "train/adapter")  # what training records beside an adapter
    rows = [{"id": str(i), "question": q, "answer": "x", "category": "c"} for i, q in enumerate(QUESTIONS)]
    (run / "data/eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gate = {
        "passed": True,
        "decision": "pass",
        "primary_metric": "token_f1",
        "rules": [],
        "reasons": [],
        "champion_version": None,
        "metrics": {"base": {"token_f1": 0.2}, "candidate": {"token_f1": 0.5}, "champion": None},
    }
    (run / "eval/gate.json").write_text(json.dumps(gate))
    (run / "eval/metrics.json").write_text(json.dumps(gate["metrics"]))
    (run / "eval/eval_report.md").write_text("# eval\n")
    (run / "version.json").write_text(json.dumps({"dataset_hash": "d41d8cd98f00b204e9800998ecf8427e"}))
    (run / "train/train_summary.json").write_text(json.dumps({"train_loss": 1.0}))
    return run


def build_champion(root: Path, base: Path, model_name: str = "qa-lora-serving") -> dict[str, Any]:
    """Export and register a run under `root` (sqlite registry in `root`); its version is the champion.

    Returns:
        {"cfg", "run", "tracking_uri", "model_name", "registration", "onnx_dir", "merged_dir"}.
    """
    from tasks.core.config import load_config
    from tasks.stages.export import export_model
    from tasks.stages.register import register_model

    run = _run_dir(root, base)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(
        overrides=[
            ("register.tracking_uri", uri),
            ("register.model_name", model_name),
            ("base.name_or_path", str(base)),
            ("export.parity_prompts", 2),
            ("export.parity_new_tokens", 4),
            ("runtime.device", "cpu"),
        ]
    )
    export = export_model(cfg, run)
    registration = register_model(cfg, run)
    assert registration["promoted"], registration
    return {
        "cfg": cfg,
        "run": run,
        "tracking_uri": uri,
        "model_name": model_name,
        "registration": registration,
        "onnx_dir": Path(export["onnx_dir"]),
        "merged_dir": Path(export["merged_dir"]),
    }


def stand_in_chat_format(directory: Path) -> None:
    """A chat_format.json for a stand-in export (structure only; no tokenizer behind it)."""
    material = {"template": "stand-in", "special_tokens": {"eos_token": ["</s>", 2]}}
    ChatFrame("[INST] ", " [/INST]", (2,), "</s>", fingerprint_of(material), material).save(directory)
