"""The tiny base's corpus and tokenizer (see tasks/plumbing/base.py for the whole build).

* Corpus: data/base_corpus.jsonl, committed (built by data/build_base_corpus.py from the language
  reference and the stdlib's module docstrings of Python 3.11.7; no function/class/method docstrings,
  which are the Q&A answers). It is read from the file, not from the running interpreter, so every
  machine builds the base from the same text. Documents marked "heldout" are kept for perplexity.
* Tokenizer: byte-level BPE trained with `tokenizers` on the training text only; `<s>` is added by the
  post-processor, `</s>` never is (answers carry it through the chat template, tasks/plumbing/chat.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tasks.core.config import PACKAGE_ROOT, TinyBaseConfig
from tasks.core.errors import UserError

BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"
UNK = "<unk>"
INST_OPEN = "[INST]"
INST_CLOSE = "[/INST]"
SYS_OPEN = "<<SYS>>"
SYS_CLOSE = "<</SYS>>"

# Part of the code, like the recipe: the checkout's own copy, whichever project a command works on.
CORPUS_FILE = PACKAGE_ROOT / "data" / "base_corpus.jsonl"

Documents = tuple[tuple[str, str], ...]  # (name, text) pairs in the corpus file's order

# Llama-2 chat layout (every stage renders with it through tasks/plumbing/chat.py):
#   <s>[INST] question [/INST] answer </s><s>[INST] next question [/INST] ...
# A system message is folded into the first user turn (<<SYS>> ... <</SYS>>), as Llama-2 does.
# {% generation %} marks assistant text for `return_assistant_tokens_mask` (TRL assistant_only_loss).
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system -%}"
    "{{ bos_token + '" + INST_OPEN + " " + SYS_OPEN + "\\n' + system + '\\n" + SYS_CLOSE + "\\n\\n' "
    "+ (message['content'] | trim) + ' " + INST_CLOSE + "' }}"
    "{%- else -%}"
    "{{ bos_token + '" + INST_OPEN + " ' + (message['content'] | trim) + ' " + INST_CLOSE + "' }}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ' }}{% generation %}{{ (message['content'] | trim) + ' ' + eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "{{ raise_exception('only system, user and assistant roles are supported, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@functools.lru_cache(maxsize=1)
def pretraining_corpus(path: Path = CORPUS_FILE) -> tuple[Documents, Documents]:
    """(train documents, held-out documents) as (name, text) pairs in file order; read once per process.

    Raises:
        UserError: the file is missing or a line is not a {"name", "split", "text"} object (file and
            line named).
    """
    train: list[tuple[str, str]] = []
    heldout: list[tuple[str, str]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the tiny base's corpus ({exc}); restore it from git") from exc
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            name, split, text = row["name"], row["split"], row["text"]
            if split not in ("train", "heldout") or not isinstance(name, str) or not isinstance(text, str):
                raise ValueError(split)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"{path}:{number}: expected a JSON object {{name, split: train|heldout, text}}; "
                "restore the file from git or rebuild it with data/build_base_corpus.py"
            ) from exc
        (train if split == "train" else heldout).append((name, text))
    return tuple(train), tuple(heldout)


def corpus_hash(docs: Iterable[tuple[str, str]]) -> str:
    """Short sha256 over the documents' names and texts (recorded with the base it built)."""
    digest = hashlib.sha256()
    for name, text in docs:
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


def train_tokenizer(texts: list[str], tiny: TinyBaseConfig) -> Any:
    """Byte-level BPE (every string encodes, decode round-trips) wrapped as a transformers tokenizer.

    Args:
        texts: the training documents only (never the held-out tails).
        tiny: reads `vocab_size` and `max_position_embeddings`.

    Returns:
        A `PreTrainedTokenizerFast` with `<unk> <s> </s> <pad>` as ids 0..3, the template markers as
        single tokens, BOS added to every sequence, and the Llama-2 chat template.
    """
    import tokenizers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = [UNK, BOS, EOS, PAD]  # ids 0..3, in this order
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # API names keep their words apart: `ArgumentTypeError` is pre-split into Argument / Type / Error (a
    # capital after a lower-case letter starts a piece), so the `Error` of every exception name is one
    # token the answers' "error" can be learnt from, instead of merges like `TypeError` that hide it.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(r"(?<=[a-z])[A-Z][a-z]*"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tiny.vocab_size - 2,  # room for the two template markers added below
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The template markers as single (non-special) tokens: they always tokenize the same way whatever
    # surrounds them, and decode keeps them.
    tok.add_tokens([AddedToken(INST_OPEN, normalized=False), AddedToken(INST_CLOSE, normalized=False)])
    bos_id = tok.token_to_id(BOS)
    # BOS on every sequence, never EOS: the answer's EOS comes from the chat template.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=tiny.max_position_embeddings,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
