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


# Today's bases: LoRA r=8 on every linear layer (LLaMA-Factory's recipe). Per layer r * (in + out) for
# q, k, v, o (grouped-query: k and v project to kv_heads * head_dim) and gate, up, down.
PRESETS = {
    # 32 layers x 8 * ((4096+4096)*2 + (4096+1024)*2 + (4096+14336)*3) = 20,971,520
    "llama3.1-8b-mi300x.yaml": ("llama-3.1-8b-instruct.config.json", 20_971_520, 8_030_261_248),
    # 28 layers x 8 * ((3584+3584)*2 + (3584+512)*2 + (3584+18944)*3) = 20,185,088
    "qwen2.5-7b-mi300x.yaml": ("qwen2.5-7b-instruct.config.json", 20_185_088, 7_615_616_512),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_todays_presets_trainable_parameters_on_the_meta_device(repo_root: Path, preset: str) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.core.config import load_config
    from tasks.stages.train.model import lora_config

    recipe, trainable_expected, base_expected = PRESETS[preset]
    cfg = load_config(repo_root / "params" / preset)
    arch = json.loads((repo_root / "models" / "recipes" / recipe).read_text())
    arch.pop("_comment")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
    assert sum(p.numel() for p in model.parameters()) == base_expected
    peft_model = get_peft_model(model, lora_config(cfg.lora))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == trainable_expected
    assert cfg.prompt.template == "auto"  # the tokenizer's own chat template renders every prompt


@pytest.mark.parametrize("preset", ["llama2-7b-mi300x.yaml", *PRESETS])
def test_info_prints_the_presets_plan_on_one_mi300x(repo_root: Path, preset: str) -> None:
    """`qa-lora info --params` sizes the preset offline (the shipped config on the meta device): the same
    counts, and the device plan's memory estimate per MI300X with the preset's precision and batch."""
    import subprocess
    import sys

    from tasks.core.config import load_config
    from tasks.plumbing.device import estimate_train_bytes

    command = [str(Path(sys.executable).with_name("qa-lora")), "info", "--params", f"params/{preset}"]
    proc = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)["training_on_mi300x"]
    cfg = load_config(repo_root / "params" / preset)
    trainable, total = {**PRESETS, "llama2-7b-mi300x.yaml": (None, 33_554_432, 6_738_415_616)}[preset][1:]
    assert (plan["trainable_params"], plan["total_params"]) == (trainable, total)
    assert plan["gpu"] == "AMD Instinct MI300X (192 GB)" and plan["precision"] == "bf16"
    arch = json.loads((repo_root / plan["config_from"]).read_text())
    expected = estimate_train_bytes(
        total_params=total,
        trainable_params=trainable,
        num_layers=arch["num_hidden_layers"],
        hidden_size=arch["hidden_size"],
        vocab_size=arch["vocab_size"],
        seq_len=cfg.train.max_length,
        micro_batch=cfg.train.per_device_train_batch_size,
        param_bytes=2,
    )
    assert plan["memory_per_gpu_gib"] == round(expected / 2**30, 1)
    assert plan["fits"] and not plan["gradient_checkpointing"] and plan["advice"] is None


def test_the_70b_preset_fits_one_mi300x_node_with_fsdp(repo_root: Path) -> None:
    """Llama-2-70B, LoRA r=16 on q/k/v/o (MLPerf's recipe with the hub's unfused projections): 80 layers x
    16 * ((8192+8192)*2 + (8192+1024)*2) = 65,536,000 trainable. Sharded over 8 GPUs with gradient
    checkpointing it needs a sixth of an MI300X; unsharded (DDP) each GPU would hold the 138 GB of weights."""
    import subprocess
    import sys

    from tasks.core.config import load_config
    from tasks.plumbing.device import estimate_train_bytes

    def plan(*overrides: str) -> dict:
        command = [
            str(Path(sys.executable).with_name("qa-lora")),
            "info",
            "--params",
            "params/llama2-70b-8xmi300x.yaml",
        ]
        for item in overrides:
            command += ["--set", item]
        proc = subprocess.run(
            command, cwd=repo_root, capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    report = plan()
    fsdp = report["training_on_mi300x"]
    assert (fsdp["trainable_params"], fsdp["total_params"]) == (65_536_000, 68_976_648_192)
    assert fsdp["distributed"] == "fsdp" and fsdp["gradient_checkpointing"] and fsdp["fits"]
    assert report["training"]["world_size"] == 8 and report["training"]["distributed"] == "fsdp"
    cfg = load_config(repo_root / "params" / "llama2-70b-8xmi300x.yaml")
    sizes = dict(
        total_params=68_976_648_192, trainable_params=65_536_000, num_layers=80, hidden_size=8192,
        vocab_size=32000, seq_len=cfg.train.max_length, micro_batch=1, param_bytes=2,
    )  # fmt: skip
    assert fsdp["memory_per_gpu_gib"] == round(
        estimate_train_bytes(**sizes, shards=8, checkpointing=True) / 2**30, 1
    )
    ddp = plan("train.distributed=ddp")["training_on_mi300x"]
    assert ddp["memory_per_gpu_gib"] > 5 * fsdp["memory_per_gpu_gib"]  # every GPU holds all the weights
    one_gpu = plan("train.num_processes=1", "train.gradient_checkpointing=false")["training_on_mi300x"]
    assert not one_gpu["fits"] and "train.distributed: fsdp" in one_gpu["advice"]
