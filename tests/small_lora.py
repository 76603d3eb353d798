"""The LoRA the short test trainings use (r=8 on q_proj/v_proj, dropout 0.05, no layer trained in full,
as params.yaml shipped before 2026-12).

params.yaml's default adapts every linear layer at r=32 without dropout and trains the tied embeddings
in full for its ~1,180 steps; the tests train 12-120 steps at higher learning rates, and their gate
margins (tests/e2e/small_run.py, the champion and evaluate tests) were measured with this smaller
adapter. Pinning it keeps them independent of the default recipe.
"""

from __future__ import annotations

SMALL_LORA = {
    "r": 8,
    "alpha": 16,
    "dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
    "modules_to_save": [],
}


def small_lora_overrides() -> list[tuple[str, object]]:
    """SMALL_LORA as `load_config(overrides=...)` pairs."""
    return [(f"lora.{key}", value) for key, value in SMALL_LORA.items()]
