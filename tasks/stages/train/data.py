"""Training data: prompt/completion rows, the seeded length-grouped sampler, the collated-batch check.

run_dir/data/{train,eval}.jsonl rows become prompt/completion pairs rendered by tasks.plumbing.prompting.
TRL then masks the prompt (completion_only_loss) and the completion ends with EOS, so the model learns to
stop; padding uses a separate pad token, never EOS. :func:`check_collation` inspects one collated batch
before training to prove both.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.plumbing.prompting import format_completion, format_prompt

log = logging.getLogger("qa_lora.train")


def prompt_completion(rows: list[dict[str, str]]) -> Any:
    """Rows -> a datasets.Dataset in TRL's prompt/completion format (the completion ends with EOS)."""
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": format_prompt(r["question"]), "completion": format_completion(r["answer"])} for r in rows]
    )


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


def check_collation(trainer: Any, tokenizer: Any) -> dict[str, Any]:
    """Inspect the prepared data and one collated batch: prompt masked, EOS trained once, pad != EOS.

    Returns:
        Data facts for the summary: truncated_rows, min_tokens, median_tokens, max_tokens.

    Raises:
        RuntimeError: one does not hold (a template or tokenizer bug, not a user error).
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    data = trainer.train_dataset
    labels_col = data["labels"]
    truncated = sum(1 for labels in labels_col if not labels or labels[-1] != eos)
    if truncated:
        log.warning(
            "%d of %d train rows were cut at train.max_length and lose their EOS "
            "(validation's too_long policy should have dropped them)",
            truncated,
            len(labels_col),
        )
    lengths = [len(ids) for ids in data["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sample = [order[0], order[len(order) // 2], order[-1]]  # different lengths: padding shows
    batch = trainer.data_collator([data[i] for i in sample])
    problems = [f"pad token id {pad} equals EOS"] if pad == eos else []
    problems += _collation_problems(batch, sample, [labels_col[i] for i in sample], eos, pad)
    if problems:
        raise RuntimeError("collated batch check failed: " + "; ".join(problems))
    facts = {
        "truncated_rows": truncated,
        "min_tokens": lengths[order[0]],
        "median_tokens": lengths[order[len(order) // 2]],
        "max_tokens": lengths[order[-1]],
    }
    log.info(
        "collated batch check: prompt masked, one EOS (id %d) trained at the end, pad id %d; "
        "train lengths %d..%d tokens (median %d)",
        eos,
        pad,
        facts["min_tokens"],
        facts["max_tokens"],
        facts["median_tokens"],
    )
    return facts


def _collation_problems(
    batch: Any, sample: list[int], row_labels: list[list[int]], eos: int, pad: int
) -> list[str]:
    """What is wrong with each collated row: unmasked prompt, padding not pad/-100, EOS count."""
    problems = []
    for row, index in enumerate(sample):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        n = int(mask.sum())
        trained = (labels != -100).nonzero().flatten().tolist()
        if not trained:
            problems.append(f"row {index} has no trained tokens")
            continue
        if trained[0] == 0 or (labels[: trained[0]] != -100).any():
            problems.append(f"row {index}: the prompt is not masked")
        if (labels[n:] != -100).any() or (ids[n:] != pad).any():
            problems.append(f"row {index}: padding is not pad/-100")
        eos_trained = int((labels == eos).sum())
        if row_labels[row][-1] == eos and (int(ids[n - 1]) != eos or eos_trained != 1):
            problems.append(f"row {index}: expected exactly one trained EOS at the end, found {eos_trained}")
    return problems
