"""Training data: the splits tokenized once into memory-mapped Arrow datasets, the seeded length-grouped
sampler, the collated-batch check.

run_dir/data/{train,eval}.jsonl rows are rendered with the base's chat template (tasks/plumbing/chat.py)
and tokenized in batches into `input_ids` and `labels` (-100 everywhere but the assistant turns: each
answer and its end-of-turn token), truncated to `train.max_length`. The result is an Arrow dataset on
disk under run_dir/train/tokenized/, keyed by the split file's hash, the chat format and the settings, so
a retry or a resumed run maps it back instead of tokenizing again, and no step holds the rows as Python
objects. The in-training evaluation uses a bounded sample of the eval split: the `eval.max_rows` rows the
evaluate stage scores (tasks/plumbing/splits.py: the same rows every run). :func:`check_collation` inspects one collated batch
before training to prove the masking.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.core.reuse import fingerprint
from tasks.plumbing.chat import ChatFormat
from tasks.plumbing.general_text import texts_digest
from tasks.plumbing.splits import eval_sample, read_split_rows

log = logging.getLogger("qa_lora.train")

DATA_VERSION = 2  # bump when the tokenized layout changes: older caches are not reused
ENCODE_BATCH = 1000
_PARALLEL_ROWS = 50_000  # below this, worker processes cost more than they save


def tokenized_split(
    chat: ChatFormat, path: Path, cache_dir: Path, max_length: int, sample: int | None = None
) -> Any:
    """The split at `path` as a memory-mapped `datasets.Dataset` of `input_ids`, `labels` and `complete`
    (the sequence ends with its end-of-turn token, uncut: the collation check reads this small column
    instead of every row's labels).

    Args:
        chat: the chat format of the base (renders, masks, tokenizes).
        path: a split file (run_dir/data/train.jsonl or eval.jsonl).
        cache_dir: where the Arrow files live (run_dir/train/tokenized); reused when the key matches.
        max_length: sequences are cut to this many tokens (validation drops longer rows).
        sample: at most this many rows, the evaluate stage's sample (None: every row).
    """
    from datasets import Dataset, Features, Value

    key = fingerprint(
        {"chat": chat.fingerprint, "max_length": max_length, "sample": sample, "v": DATA_VERSION}, [path]
    )
    features = Features({name: Value("string") for name in ("question", "answer", "system", "history")})
    rows = Dataset.from_generator(
        _rows,
        features=features,
        gen_kwargs={"path": str(path), "sample": sample, "key": key},
        cache_dir=str(cache_dir),
    )
    workers = min(4, os.cpu_count() or 1) if len(rows) >= _PARALLEL_ROWS else None
    return rows.map(
        _encode_batch,
        batched=True,
        batch_size=ENCODE_BATCH,
        writer_batch_size=ENCODE_BATCH,
        fn_kwargs={"chat": chat, "max_length": max_length},
        remove_columns=rows.column_names,
        new_fingerprint=key,
        num_proc=workers,
        desc=f"tokenizing {path.name}",
    )


def with_replay(
    chat: ChatFormat, sft: Any, texts: list[str], settings: tuple[float, int, int], cache_dir: Path
) -> Any:
    """`sft` followed by `round(ratio * len(sft))` blocks of general text (`settings`: ratio, block tokens,
    seed): cuts of the texts' token stream (each document `text <eos>` after the
    tokenizer's own special tokens, as the tiny base was pretrained), labels on every token. Plain language
    modelling beside the SFT rows keeps the base's general text (replay). Blocks repeat in a seeded order
    when more are asked than the text holds; the SFT rows stay first (`check_collation` reads only them).
    """
    from datasets import Dataset, concatenate_datasets

    ratio, block, seed = settings
    count = round(ratio * len(sft))
    if count == 0:
        return sft
    key = fingerprint(
        {
            "chat": chat.fingerprint,
            "texts": texts_digest(texts),
            "n": count,
            "len": block,
            "seed": seed,
            "v": DATA_VERSION,
        }
    )
    blocks = Dataset.from_generator(
        _replay_blocks,
        features=sft.features,
        gen_kwargs={
            "chat": chat,
            "texts": tuple(texts),  # a list would be sharded: one generator call per text
            "count": count,
            "block": block,
            "seed": seed,
            "key": key,
        },
        cache_dir=str(cache_dir),
    )
    log.info("replay: %d blocks of %d tokens of general text beside %d SFT rows", count, block, len(sft))
    return concatenate_datasets([sft, blocks])


def _replay_blocks(
    chat: ChatFormat, texts: tuple[str, ...], count: int, block: int, seed: int, key: str
) -> Iterator[dict[str, Any]]:
    """`count` blocks of the texts' token stream, cycling through a seeded permutation; `key` names the cache."""
    import random

    del key
    tokenizer = chat.tokenizer
    stream: list[int] = []
    for start in range(0, len(texts), ENCODE_BATCH):
        for ids in tokenizer(list(texts[start : start + ENCODE_BATCH]), verbose=False)["input_ids"]:
            stream += [*ids, tokenizer.eos_token_id]
    blocks = [stream[i : i + block] for i in range(0, max(1, len(stream) - block + 1), block)]
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < count:
        order += rng.sample(range(len(blocks)), len(blocks))
    for index in order[:count]:
        yield {"input_ids": blocks[index], "labels": blocks[index], "complete": True}


def _rows(path: str, sample: int | None, key: str) -> Iterator[dict[str, str | None]]:
    """Split rows for Arrow (history as JSON text); `key` only names the cache entry."""
    del key
    rows = read_split_rows(Path(path)) if sample is None else eval_sample(Path(path), sample)
    for row in rows:
        history = row.get("history")
        yield {
            "question": row["question"],
            "answer": row["answer"],
            "system": row.get("system"),
            "history": json.dumps(history, ensure_ascii=False) if history else None,
        }


def _encode_batch(batch: dict[str, list[Any]], chat: ChatFormat, max_length: int) -> dict[str, list[Any]]:
    rows = [
        {"question": q, "answer": a, "system": s, "history": json.loads(h) if h else None}
        for q, a, s, h in zip(
            batch["question"], batch["answer"], batch["system"], batch["history"], strict=True
        )
    ]
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "complete": []}
    for ids, mask in chat.encode(rows):
        out["input_ids"].append(ids[:max_length])
        out["labels"].append(_labels(ids, mask)[:max_length])
        out["complete"].append(len(ids) <= max_length and ids[-1] == chat.end_of_turn_id)
    return out


def _labels(ids: list[int], mask: list[int]) -> list[int]:
    """`ids` with -100 where the mask is 0 (one answer: the masked prompt, then the answer as is)."""
    first = mask.index(1) if 1 in mask else len(mask)
    if all(mask[first:]):
        return [-100] * first + ids[first:]
    return [t if m else -100 for t, m in zip(ids, mask, strict=True)]


def sequence_lengths(data: Any) -> Any:
    """Token count per row (numpy), read from the Arrow offsets without materialising the rows."""
    import pyarrow.compute as pc

    return pc.list_value_length(_column(data, "input_ids")).to_numpy()


class EpochSampler:
    """Seeded per-epoch order; with `lengths`, batches of similar length.

    transformers 5 dropped `group_by_length`; its `train_sampling_strategy="group_by_length"` groups
    per-device batches, so N processes would see other samples per step than one process.

    Indices are shuffled, cut into mega-batches of 50 global batches, sorted by length inside each,
    cut into global batches (per-device batch x processes x accumulation), and the full global
    batches are shuffled; the longest one goes first (an out-of-memory shows at step 1, not at the
    end) and a partial last batch stays last. accelerate hands each process consecutive per-device
    slices of this order, so every optimizer step trains on the same samples whatever the number of
    processes. The epoch seed makes a resumed run replay exactly the uninterrupted order.
    """

    def __init__(self, size: int, seed: int, global_batch: int, lengths: list[int] | None = None) -> None:
        self.size = size
        self.seed = seed
        self.global_batch = global_batch
        self.lengths = lengths
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Any:
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return iter(order)
        lengths, size = self.lengths, self.global_batch
        mega = size * 50
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        tail = [batches.pop()] if batches and len(batches[-1]) < size else []
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
        if batches:
            longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
            batches[0], batches[longest] = batches[longest], batches[0]
        return iter([i for batch in batches + tail for i in batch])


def _column(data: Any, name: str) -> Any:
    """A column as Arrow (memory-mapped, no Python objects), honouring a selection of rows."""
    return data.with_format("arrow")[name]


def check_collation(trainer: Any, chat: ChatFormat, sft_rows: int | None = None) -> dict[str, Any]:
    """Inspect the prepared data and one collated batch: the prompt and user turns masked, every assistant
    turn trained up to and including one end-of-turn token, padding neither trained nor a stop token.

    Args:
        sft_rows: the SFT rows come first, then replay blocks (`with_replay`): only the rows are checked.

    Returns:
        Data facts for the summary: truncated_rows, min_tokens, median_tokens, max_tokens (SFT rows).

    Raises:
        RuntimeError: one does not hold (a template or tokenizer bug, not a user error).
    """
    import numpy as np

    eot, pad = chat.end_of_turn_id, chat.tokenizer.pad_token_id
    data = trainer.train_dataset
    if sft_rows is not None and sft_rows < len(data):
        data = data.select(range(sft_rows))
    lengths = sequence_lengths(data)
    truncated = int((~_column(data, "complete").to_numpy(zero_copy_only=False)).sum())
    if truncated:
        log.warning(
            "%d of %d train rows were cut at train.max_length and lose their end-of-turn token "
            "(validation's too_long policy should have dropped them)",
            truncated,
            len(lengths),
        )
    order = np.argsort(lengths, kind="stable")
    sample = [int(order[0]), int(order[len(order) // 2]), int(order[-1])]  # different lengths: padding shows
    batch = trainer.data_collator([data[i] for i in sample])
    problems = [f"pad token id {pad} is a stop token"] if pad in chat.stop_token_ids else []
    problems += _collation_problems(batch, sample, eot, pad)
    if problems:
        raise RuntimeError("collated batch check failed: " + "; ".join(problems))
    facts = {
        "truncated_rows": truncated,
        "min_tokens": int(lengths[sample[0]]),
        "median_tokens": int(lengths[sample[1]]),
        "max_tokens": int(lengths[sample[2]]),
    }
    log.info(
        "collated batch check: prompt masked, each answer trained up to one end-of-turn token (%r, id %d), "
        "pad id %d; train lengths %d..%d tokens (median %d)",
        chat.end_of_turn,
        eot,
        pad,
        facts["min_tokens"],
        facts["max_tokens"],
        facts["median_tokens"],
    )
    return facts


def _collation_problems(batch: Any, sample: list[int], eot: int, pad: int) -> list[str]:
    """What is wrong with each collated row: unmasked prompt, padding not pad/-100, end-of-turn count."""
    problems = []
    for row, index in enumerate(sample):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        n = int(mask.sum())
        trained = (labels != -100).nonzero().flatten().tolist()
        if not trained:
            problems.append(f"row {index} has no trained tokens")
            continue
        if trained[0] == 0:
            problems.append(f"row {index}: the prompt is not masked")
        if (labels[n:] != -100).any() or (ids[n:] != pad).any():
            problems.append(f"row {index}: padding is not pad/-100")
        runs = [i for i in trained if i + 1 not in trained]  # the last position of each assistant turn
        eots = int((labels == eot).sum())
        if int(ids[n - 1]) == eot and (eots != len(runs) or any(int(labels[i]) != eot for i in runs)):
            problems.append(f"row {index}: expected each answer to end with one trained end-of-turn token")
    return problems
