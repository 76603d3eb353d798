"""What a model card may say of the base: its hub id, or a local directory's name, never a local path.

PEFT writes the adapter's README.md with `base_model: <the path it loaded>`; on a node that is an absolute
path of that machine, useless to a hub or catalog and telling of the machine. `scrub_adapter_card`
rewrites it; the export's card (stages/export/card.py) names the base through `base_name` too.
"""

from __future__ import annotations

from pathlib import Path

from tasks.core.config import Config


def hub_base_id(cfg: Config) -> str | None:
    """The base's hub id; None when it is the tiny base or a local directory."""
    ref = cfg.base.name_or_path
    if cfg.base.kind == "tiny" or Path(ref).is_absolute() or cfg.resolve(ref).exists():
        return None
    return ref


def base_name(cfg: Config) -> str:
    """The base as a card names it: its hub id, or `<directory name> (local)`."""
    return hub_base_id(cfg) or f"{Path(cfg.base.name_or_path).name} (local)"


def scrub_adapter_card(readme: Path, cfg: Config) -> None:
    """Rewrite PEFT's adapter card metadata: base_model the hub id (or none), no tag naming a local path."""
    if not readme.is_file():
        return
    from huggingface_hub import ModelCard

    card = ModelCard.load(readme)
    local = str(cfg.base.name_or_path), str(cfg.resolve(cfg.base.name_or_path))
    card.data.base_model = hub_base_id(cfg)
    tags = [t for t in card.data.tags or [] if not any(p in t for p in local)]
    card.data.tags = [*tags, "qa-lora"] if "qa-lora" not in tags else tags
    text = str(card)
    for path in local:
        text = text.replace(path, base_name(cfg))
    readme.write_text(text, encoding="utf-8")
