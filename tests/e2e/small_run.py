"""The one small-but-real run the end-to-end tests use (CLI, DVC and the Airflow services alike).

Enough steps for the tiny model to beat its base, few eval rows, few parity prompts. Each test adds the
sections that point at its own temp dir (registry, DVC remote, runs root) and writes one params overlay.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from small_lora import SHORT_RUN_GATE, SHORT_RUN_TRAIN, SMALL_LORA

SMALL_RUN: dict[str, dict[str, Any]] = {
    # The r=8 q/v adapter with the tied embeddings trained in full, lr 4e-3, 120 steps. With the base
    # pretrained at lr 1e-3 (2026-12-03; a stronger base: eval F1 0.017 vs 0.006 on these 80 rows) the
    # adapter alone left the gate close (CI low of candidate - base F1, fp32 seeds 0 / 1 / 2: +0.0185 /
    # +0.0118 / +0.0152; 200 steps or lr 6e-3 or all 7 linear layers: +0.018 on seed 1). Training the
    # embeddings as well, measured on an AVX2-only EPYC (benchmarks/RESULTS.md, #15 item 2): fp32
    # +0.0546 / +0.0308 / +0.0294, bf16 +0.0522 / +0.0275 / +0.0309. With the camel-case tokenizer (base
    # code 3; avx512_bf16 EPYC): fp32 +0.0286 / +0.0367 / +0.0388, bf16 +0.0235 / +0.0305 / +0.0405.
    "lora": {**SMALL_LORA, "modules_to_save": ["embed_tokens"]},
    "train": {
        "max_steps": 120,
        "save_steps": 60,
        "logging_steps": 20,
        "learning_rate": 0.004,
        **SHORT_RUN_TRAIN,
    },
    "eval": {"max_rows": 80, "max_new_tokens": 32, "bootstrap_samples": 300},
    # 80 rows cannot support per-slice gating; the slice rule has its own tests. A 2-core test machine
    # running Airflow's services beside the export measures +-25% per process: a slowdown rule tighter
    # than 2x would fail by chance here (tests/unit/test_serving_gate.py holds the rule itself).
    # The forgetting rule is off (tests/small_lora.py says why); test_forgetting_run.py turns it on.
    "gate": {"min_slice_size": 1000, "max_latency_regression": 1.0, **SHORT_RUN_GATE},
    "export": {"parity_prompts": 4, "parity_new_tokens": 8, "serving_prompts": 8},
}


def write_overlay(path: Path, repo: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write `extends: <repo>/params.yaml` + SMALL_RUN, with `sections` merged in key by key."""
    doc: dict[str, Any] = {"extends": str(repo / "params.yaml")}
    for name in dict.fromkeys([*SMALL_RUN, *sections]):
        doc[name] = {**SMALL_RUN.get(name, {}), **sections.get(name, {})}
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path
