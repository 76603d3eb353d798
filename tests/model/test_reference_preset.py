"""The reference preset reproduces the walkthrough's trainable-parameter figure on the meta device.

AMD's walkthrough reports 33,554,432 trainable of 6,771,970,048 parameters (0.4955%) for LoRA r=64 on
q_proj/v_proj of Llama-2-7b-chat. Built from the shipped architecture config: no weights, no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_llama2_7b_preset_trainable_parameters(repo_root: Path) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tasks.core.config import load_config
    from tasks.stages.train.model import lora_config

    cfg = load_config(repo_root / "params" / "llama2-7b-mi300x.yaml")
    arch = json.loads((repo_root / "models" / "recipes" / "llama-2-7b-chat-hf.config.json").read_text())
    arch.pop("_comment")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**arch))
    peft_model = get_peft_model(model, lora_config(cfg.lora))  # the train stage's own translation
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    assert trainable == 33_554_432
    assert total == 6_771_970_048
    assert 100 * trainable / total == pytest.approx(0.4955, abs=5e-5)
