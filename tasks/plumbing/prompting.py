"""The one prompt template, shared by validation (token lengths, forged turns), training and evaluation.

Llama-2 chat format, as in the reference walkthrough: `<s>[INST] {question} [/INST] {answer} </s>`.
The tiny base uses the same special tokens, so one template serves both. The answer ends with EOS so
the model learns to stop; padding uses a separate pad token so EOS is never masked as padding.
"""

from __future__ import annotations

import re

BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"
UNK = "<unk>"
INST_OPEN = "[INST]"
INST_CLOSE = "[/INST]"
SYS_OPEN = "<<SYS>>"
SYS_CLOSE = "<</SYS>>"

# Sequences that, inside user text, could forge a turn in this template or in common chat templates.
CONTROL_SEQUENCES: tuple[str, ...] = (
    INST_OPEN,
    INST_CLOSE,
    BOS,
    EOS,
    SYS_OPEN,
    SYS_CLOSE,
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
)

_CONTROL_RE = re.compile("|".join(re.escape(s) for s in CONTROL_SEQUENCES), re.IGNORECASE)


def format_prompt(question: str) -> str:
    """The prompt part (what the model is given), without BOS: the tokenizer adds it."""
    return f"{INST_OPEN} {question.strip()} {INST_CLOSE}"


def format_completion(answer: str) -> str:
    """The completion part (what the model learns to produce), ending with EOS."""
    return f" {answer.strip()} {EOS}"


def find_control_sequences(text: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Control sequences (template markers, special tokens) found in user text."""
    found = [m.group(0) for m in _CONTROL_RE.finditer(text)]
    found += [tok for tok in extra if tok and tok in text and tok not in found]
    return found
