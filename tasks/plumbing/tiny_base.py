"""Building the tiny base: model -> pretraining loop -> held-out perplexity -> save (tasks/plumbing/base.py
decides whether to build; tasks/plumbing/tiny_corpus.py supplies the corpus and tokenizer).

* Model: a LlamaForCausalLM sized by `base.tiny`, pretrained full-parameter, fp32, plain PyTorch
  (AdamW, warmup + cosine) on random windows of the token stream.
* Output: Hugging Face format (safetensors, config, generation_config, tokenizer) written through an
  atomic temporary directory, plus `qa_lora_base.json` with the recipe hash that makes a second call a
  no-op.

torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir, write_json_atomic
from tasks.core.config import TinyBaseConfig
from tasks.core.errors import UserError
from tasks.plumbing.tiny_corpus import (
    CORPUS_FILE,
    Documents,
    corpus_hash,
    pretraining_corpus,
    train_tokenizer,
)

log = logging.getLogger("qa_lora.base")

# Bump when a change here changes the built model (corpus, tokenizer, schedule...): cached builds
# made by older code then no longer match and are rebuilt. 2: the corpus is the committed
# data/base_corpus.jsonl, no longer the running interpreter's docs (which differ between Python builds).
# 3: the tokenizer splits camel-case names into their words (tiny_corpus.train_tokenizer).
CODE_VERSION = "3"
META_FILE = "qa_lora_base.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", META_FILE)


def build_tiny_base(tiny: TinyBaseConfig, out: Path, recipe: str, num_threads: int) -> dict[str, Any]:
    """Train the tokenizer, pretrain the model, measure held-out perplexity, save atomically at `out`.

    Args:
        tiny: the `base.tiny` recipe.
        out: the model directory to (re)place.
        recipe: the recipe hash, recorded in the metadata file for reuse.
        num_threads: intra-op threads for the build (0: torch's default); recorded.

    Returns:
        The metadata written to `out/qa_lora_base.json`.
    """
    started = time.perf_counter()
    train_docs, heldout_docs = pretraining_corpus()
    corpus = corpus_hash((*train_docs, *heldout_docs))
    tokenizer = train_tokenizer([text for _, text in train_docs], tiny)
    _log_corpus(corpus, train_docs, heldout_docs, tokenizer, started)
    train_ids = _token_stream(tokenizer, train_docs)
    heldout_ids = _token_stream(tokenizer, heldout_docs)

    with _deterministic_torch(num_threads) as threads:
        model = _init_model(tiny, tokenizer)
        params = sum(p.numel() for p in model.parameters())
        log.info(
            "model: %d parameters; train stream %d tokens, held-out %d",
            params,
            len(train_ids),
            len(heldout_ids),
        )
        final_loss = _pretrain(model, train_ids, tiny)
        ppl = _perplexity(model, heldout_ids, tiny.pretrain_seq_len)
    seconds = time.perf_counter() - started
    log.info("held-out perplexity %.2f (vocab %d); built in %.1fs", ppl, len(tokenizer), seconds)

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {
            "recipe_hash": recipe,
            "code_version": CODE_VERSION,
            "recipe": tiny.model_dump(),
            "corpus_hash": corpus,
            "corpus": _corpus_stats(train_docs, heldout_docs, train_ids, heldout_ids),
            "parameters": params,
            "vocab_size": len(tokenizer),
            "final_train_loss": round(final_loss, 4),
            "heldout_perplexity": round(ppl, 3),
            "weights_sha256": weights_hash(tmp / "model.safetensors"),
            "threads": threads,
            "torch": _torch_version(),
            "build_seconds": round(seconds, 1),
        }
        write_json_atomic(tmp / META_FILE, meta)
    return meta


def _log_corpus(
    corpus: str, train_docs: Documents, heldout_docs: Documents, tokenizer: Any, started: float
) -> None:
    log.info(
        "corpus %s: %d train docs (%d chars), %d held-out (%d chars); tokenizer %d tokens in %.1fs",
        corpus,
        len(train_docs),
        sum(len(t) for _, t in train_docs),
        len(heldout_docs),
        sum(len(t) for _, t in heldout_docs),
        len(tokenizer),
        time.perf_counter() - started,
    )


def _corpus_stats(
    train_docs: Documents, heldout_docs: Documents, train_ids: list[int], heldout_ids: list[int]
) -> dict[str, Any]:
    return {
        "sources": [f"data/{CORPUS_FILE.name} (data/build_base_corpus.py: Python docs, no API docstrings)"],
        "train_docs": len(train_docs),
        "heldout_docs": len(heldout_docs),
        "train_tokens": len(train_ids),
        "heldout_tokens": len(heldout_ids),
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def _token_stream(tokenizer: Any, docs: Sequence[tuple[str, str]]) -> list[int]:
    # Every document is one sequence <s> text </s>: the model sees where texts start and end.
    # (The backend tokenizer directly: documents are longer than model_max_length, which is fine here.)
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch([text for _, text in docs]):
        ids += [*encoding.ids, tokenizer.eos_token_id]
    return ids


@contextlib.contextmanager
def _deterministic_torch(num_threads: int) -> Iterator[int]:
    """Deterministic kernels and a fixed thread count for the build; the caller's settings come back."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield torch.get_num_threads()
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def _init_model(tiny: TinyBaseConfig, tokenizer: Any) -> Any:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Tied input/output embeddings: at this size the two vocab matrices would be ~40% of the model.
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    torch.manual_seed(tiny.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _optimizer_and_schedule(model: Any, tiny: TinyBaseConfig) -> tuple[Any, Any]:
    """AdamW with the usual LM betas, no weight decay on norms (1-d weights); warmup then cosine to 10%."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tiny.pretrain_learning_rate,
        betas=(0.9, 0.95),
    )
    steps = tiny.pretrain_steps
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def _pretrain(model: Any, stream: list[int], tiny: TinyBaseConfig) -> float:
    """Full-parameter pretraining on random windows of the stream; returns the last logged loss."""
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    seq, batch, steps = tiny.pretrain_seq_len, tiny.pretrain_batch_size, tiny.pretrain_steps
    if len(data) <= seq:
        raise UserError(f"base.tiny.pretrain_seq_len: {seq} is longer than the corpus ({len(data)} tokens)")
    generator = torch.Generator().manual_seed(tiny.seed)
    optimizer, scheduler = _optimizer_and_schedule(model, tiny)
    model.train()
    every = max(1, steps // 20)
    started = time.perf_counter()
    running, last = 0.0, float("nan")
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq, (batch,), generator=generator)
        ids = torch.stack([data[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % every == 0 or step + 1 == steps:
            last, running = running / ((step % every) + 1), 0.0
            elapsed = time.perf_counter() - started
            eta = elapsed / (step + 1) * (steps - step - 1)
            lr = scheduler.get_last_lr()[0]
            log.info(
                "step %d/%d loss %.4f lr %.2e elapsed %.0fs eta %.0fs",
                step + 1,
                steps,
                last,
                lr,
                elapsed,
                eta,
            )
    model.eval()
    return last


def _perplexity(model: Any, stream: list[int], seq: int) -> float:
    """exp(mean next-token loss) over consecutive, non-overlapping windows of the held-out stream."""
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data) - 1, seq):
            ids = data[start : start + seq].unsqueeze(0)
            if ids.shape[1] < 2:
                break
            loss = model(input_ids=ids, labels=ids).loss
            tokens = ids.shape[1] - 1
            total += loss.item() * tokens
            count += tokens
    return math.exp(total / count) if count else float("nan")


def weights_hash(path: Path) -> str:
    """sha256 over the tensors (names, dtypes, shapes, bytes), independent of file metadata."""
    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
