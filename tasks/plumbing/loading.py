"""Base-model resolution and tokenizer loading: the one implementation every stage uses.

* :func:`resolve_base` turns `base.name_or_path` into what `from_pretrained` takes (a local model
  directory with safetensors weights, or a hub id) and refuses anything else with one line.
* :func:`load_tokenizer` loads the tokenizer that goes with a model (the adapter's copy when training
  saved one, else the base's) with the chat template the pipeline renders with (the tokenizer's own, or
  `prompt.template`; tasks/plumbing/chat.py) and ONE pad-token rule: the pad token must differ from EOS
  and from the template's end-of-turn token. Hub Llamas ship without a pad token; we then pad with `unk`,
  or a reserved pad token such as Llama-3's `<|finetune_right_pad_id|>`. Padding with a stop token would
  teach the model never to stop, and train, evaluate and export must tokenize a prompt identically
  (tests/model hold that).

transformers is imported inside the functions: importing this module stays cheap (DAG parsing).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tasks.core.config import Config
from tasks.core.errors import UserError

log = logging.getLogger("qa_lora.loading")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLES = (".bin", ".pt", ".pth", ".ckpt")
# Tried in order when a tokenizer has no pad token distinct from its stop tokens (after `unk`).
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "[PAD]")


@dataclass(frozen=True)
class BaseRef:
    """The base model as `from_pretrained` takes it: `ref` is a local directory or a hub id."""

    ref: str
    local: bool


def hub_kwargs(cfg: Config) -> dict[str, Any]:
    """The `from_pretrained` keywords that pin a hub model (revision, remote-code policy)."""
    return {"revision": cfg.base.revision, "trust_remote_code": cfg.base.trust_remote_code}


def resolve_base(cfg: Config) -> BaseRef:
    """The base model of `cfg`: a local model directory (checked) or a hub id (loaded where online).

    Raises:
        UserError: the path is missing (for the tiny base: run `qa-lora base`), is a file, has no
            config.json, or has no weights other than pickles while `base.allow_pickle_weights` is off.
    """
    name = cfg.base.name_or_path
    path = cfg.resolve(name)
    if path.is_dir():
        _check_model_dir(cfg, path)
        return BaseRef(str(path), local=True)
    if path.exists():
        raise UserError(f"base.name_or_path: {path} is a file; expected a model directory or a hub id")
    if cfg.base.kind == "tiny" or not _HUB_ID.match(name) or name.startswith((".", "~")):
        hint = "; run `qa-lora base` to build the tiny base" if cfg.base.kind == "tiny" else ""
        raise UserError(f"base.name_or_path: {path} does not exist{hint}")
    return BaseRef(name, local=False)


def _check_model_dir(cfg: Config, path: Path) -> None:
    if not (path / "config.json").is_file():
        raise UserError(f"base.name_or_path: {path} has no config.json (not a Hugging Face model directory)")
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLES)
    if not pickles:
        raise UserError(f"base.name_or_path: {path} holds no model weights (*.safetensors)")
    if not cfg.base.allow_pickle_weights:
        raise UserError(
            f"base.name_or_path: {path} has no *.safetensors weights, only pickle files "
            f"({', '.join(pickles[:3])}); convert them, or set base.allow_pickle_weights=true "
            "if you trust them (loading a pickle can execute code)"
        )


def load_tokenizer(
    cfg: Config,
    adapter_dir: Path | None = None,
    *,
    padding_side: Literal["left", "right"] = "left",
) -> Any:
    """The tokenizer of the base model (or the copy saved beside an adapter), with the one pad rule.

    Args:
        cfg: reads `base` (name_or_path, revision, trust_remote_code).
        adapter_dir: a trained adapter's directory; its tokenizer wins when training saved one there.
        padding_side: "right" for training batches, "left" for generation (the last position is the
            next-token one).

    Raises:
        UserError: the tokenizer cannot be loaded, has no chat template and `prompt.template` names none,
            has no EOS token, or has no pad token distinct from its stop tokens and none to use instead.
    """
    from transformers import AutoTokenizer

    from tasks.plumbing.chat import chat_format, use_template

    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file():
        source, kwargs = str(adapter_dir), {}
    else:
        source, kwargs = resolve_base(cfg).ref, hub_kwargs(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"base.name_or_path={cfg.base.name_or_path!r}: cannot load its tokenizer ({first})"
        ) from None
    use_template(tokenizer, cfg.prompt.template, source)
    apply_pad_rule(tokenizer, source, chat_format(cfg, tokenizer).stop_token_ids)
    tokenizer.padding_side = padding_side
    return tokenizer


def apply_pad_rule(tokenizer: Any, source: str, stops: tuple[int, ...] = ()) -> str | None:
    """Make the pad token differ from EOS and the `stops` (use `unk` or a reserved pad token); returns a
    note when it had to change it.

    Raises:
        UserError: no EOS token, or no pad token distinct from the stop tokens and none to use instead.
    """
    if tokenizer.eos_token_id is None:
        raise UserError(f"base.name_or_path: the tokenizer of {source} has no EOS token")
    avoid = {tokenizer.eos_token_id, *stops}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in avoid:
        return None
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.unk_token, *_PAD_CANDIDATES):
        if candidate in vocab and vocab[candidate] not in avoid and candidate != tokenizer.bos_token:
            tokenizer.pad_token = candidate
            note = f"pad token set to {candidate!r} (the tokenizer had none distinct from its stop tokens)"
            log.info(note)
            return note
    raise UserError(
        f"base.name_or_path: the tokenizer of {source} has no pad token distinct from its stop tokens and "
        f"none of unk, {', '.join(_PAD_CANDIDATES)} (padding with a stop token would teach the model never to stop)"
    )
