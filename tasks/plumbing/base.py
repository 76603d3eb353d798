"""`qa-lora base`: build (or reuse) the embedded tiny Llama that the pipeline fine-tunes when no hub
model is configured.

Readable top to bottom: corpus -> tokenizer -> model -> pretraining loop -> held-out perplexity -> save.
This module decides whether to build (recipe checks, the reuse-or-build step under a lock); the parts
live beside it: tasks/plumbing/tiny_corpus.py (corpus and tokenizer) and tasks/plumbing/tiny_base.py
(model, pretraining, perplexity, the atomic save). The output is Hugging Face format at
`base.name_or_path` plus `qa_lora_base.json`, whose recipe hash makes a second call a no-op.

Determinism (same `base.tiny` -> bit-identical weights) depends on: the corpus (data/base_corpus.jsonl,
committed, so the same on every machine and interpreter; its hash is recorded), the torch build and
CPU instruction set (oneDNN/MKL kernels), and the number of intra-op threads (reductions are split per
thread; recorded as `threads`). Within those, everything is seeded: the tokenizer trainer sees a
sorted corpus, weights are initialised and batches drawn from `seed`, the build runs on CPU with
`torch.use_deterministic_algorithms(True)` and no dropout.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tasks.core.config import Config, TinyBaseConfig
from tasks.core.errors import UserError
from tasks.core.reuse import file_lock, fingerprint, reusable
from tasks.plumbing.tiny_base import CODE_VERSION, META_FILE, REQUIRED_FILES, build_tiny_base

__all__ = ["CODE_VERSION", "META_FILE", "build_base_model", "recipe_hash"]

log = logging.getLogger("qa_lora.base")


def build_base_model(cfg: Config) -> dict[str, Any]:
    """Build the embedded tiny base model at `base.name_or_path`, or reuse the cached build.

    Args:
        cfg: the pipeline configuration; reads `base` (kind, name_or_path, tiny) and
            `runtime.num_threads`.

    Returns:
        `{"path", "parameters", "heldout_perplexity", "vocab_size", "built", "seconds",
        "recipe_hash", "weights_sha256"}`; `built` is False when the cached build was reused. For
        `base.kind == "hub"` nothing is built and the numbers are None (the train stage loads it).

    Raises:
        UserError: `base.name_or_path` is an existing directory that this stage did not build, or the
            `base.tiny` shapes do not fit together.
    """
    started = time.perf_counter()
    if cfg.base.kind == "hub":
        return _hub_result(cfg)
    _check_recipe(cfg.base.tiny)
    out = cfg.resolve(cfg.base.name_or_path)
    recipe = recipe_hash(cfg.base.tiny)
    # A lock, because several processes (parallel test sessions, an Airflow task and a CLI call) may
    # ask for the same base at once; the second one then finds the finished build.
    with file_lock(out.parent / f".{out.name}.lock"):
        meta = reusable(
            out / META_FILE, recipe, required=[out / f for f in REQUIRED_FILES], key="recipe_hash"
        )
        built = meta is None
        if meta is None:
            _refuse_foreign_dir(out)
            log.info("building tiny base %s (recipe %s) at %s", _describe(cfg.base.tiny), recipe, out)
            meta = build_tiny_base(cfg.base.tiny, out, recipe, cfg.runtime.num_threads)
        else:
            log.info("reusing tiny base at %s (recipe %s)", out, recipe)
    return {
        "path": str(out),
        "parameters": meta["parameters"],
        "heldout_perplexity": meta["heldout_perplexity"],
        "vocab_size": meta["vocab_size"],
        "built": built,
        "seconds": round(time.perf_counter() - started, 3),
        "recipe_hash": recipe,
        "weights_sha256": meta["weights_sha256"],
    }


def recipe_hash(tiny: TinyBaseConfig) -> str:
    """Short hash of what determines the built model: the `base.tiny` recipe and CODE_VERSION."""
    return fingerprint({"tiny": tiny.model_dump(), "code": CODE_VERSION})


def _hub_result(cfg: Config) -> dict[str, Any]:
    return {
        "path": cfg.base.name_or_path,
        "parameters": None,
        "heldout_perplexity": None,
        "vocab_size": None,
        "built": False,
        "seconds": 0.0,
        "recipe_hash": None,
        "weights_sha256": None,
    }


def _check_recipe(tiny: TinyBaseConfig) -> None:
    # Shapes LlamaConfig would reject with a traceback (or, for the sequence length, fail mid-training).
    if tiny.hidden_size % tiny.num_attention_heads:
        raise UserError(
            f"base.tiny.hidden_size: {tiny.hidden_size} must be a multiple of "
            f"base.tiny.num_attention_heads ({tiny.num_attention_heads})"
        )
    if tiny.num_attention_heads % tiny.num_key_value_heads:
        raise UserError(
            f"base.tiny.num_attention_heads: {tiny.num_attention_heads} must be a multiple of "
            f"base.tiny.num_key_value_heads ({tiny.num_key_value_heads})"
        )
    if tiny.pretrain_seq_len > tiny.max_position_embeddings:
        raise UserError(
            f"base.tiny.pretrain_seq_len: {tiny.pretrain_seq_len} exceeds "
            f"base.tiny.max_position_embeddings ({tiny.max_position_embeddings})"
        )


def _describe(tiny: TinyBaseConfig) -> str:
    return (
        f"{tiny.num_hidden_layers}x{tiny.hidden_size} vocab {tiny.vocab_size}, "
        f"{tiny.pretrain_steps} steps of {tiny.pretrain_batch_size}x{tiny.pretrain_seq_len}"
    )


def _refuse_foreign_dir(out: Path) -> None:
    # Rebuilding replaces the directory: never do that to a model someone put there by hand.
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise UserError(
            f"base.name_or_path: {out} exists and was not built by `qa-lora base` "
            f"(no {META_FILE}); set base.kind=hub to use it as is, or point base.name_or_path elsewhere"
        )
