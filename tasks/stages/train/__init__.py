"""The train stage: LoRA SFT of the base model (see stage.py for the steps and where each part lives)."""

from tasks.stages.train.stage import train_adapter

__all__ = ["train_adapter"]
