"""The tiny base's corpus and tokenizer (see tasks/plumbing/base.py for the whole build).

* Corpus: prose that ships with every Python, so the build needs no network: the language reference
  (`pydoc_data.topics`, ~465K chars) plus the *module-level* docstrings of the standard library, read
  with `ast` (no imports, no side effects). Function/class/method docstrings are NOT used: the Q&A
  dataset (data/qa.jsonl) is built from those, and its eval split must not leak into pretraining.
  The tail (~5%, at a paragraph boundary) of every language-reference topic is held out for perplexity.
* Tokenizer: byte-level BPE trained with `tokenizers` on the training text only; `<s>` is added by the
  post-processor, `</s>` never is (answers carry it through the chat template / prompting.py).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tasks.core.config import TinyBaseConfig
from tasks.plumbing.prompting import BOS, EOS, INST_CLOSE, INST_OPEN, PAD, SYS_CLOSE, SYS_OPEN, UNK

HELDOUT_FRACTION = 0.05  # tail share of each language-reference topic kept for perplexity
# Stdlib parts whose module docstrings are not prose about Python (tests, IDLE, demos, vendored code).
_SKIP_PARTS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"})

Documents = tuple[tuple[str, str], ...]  # sorted (name, text) pairs

# Llama-2 chat layout, the same string as tasks/plumbing/prompting.py renders:
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
def pretraining_corpus() -> tuple[Documents, Documents]:
    """(train documents, held-out documents) as sorted (name, text) pairs; read once per process."""
    import pydoc_data.topics

    train: list[tuple[str, str]] = []
    heldout: list[tuple[str, str]] = []
    for name in sorted(pydoc_data.topics.topics):
        text = _clean(pydoc_data.topics.topics[name])
        head, tail = _split_tail(text, HELDOUT_FRACTION)
        train.append((f"topics/{name}", head))
        if tail:
            heldout.append((f"topics/{name}", tail))
    train += _module_docstrings()
    return tuple(train), tuple(heldout)


def corpus_hash(docs: Iterable[tuple[str, str]]) -> str:
    """Short sha256 over the documents' names and texts (recorded: the corpus depends on the Python)."""
    digest = hashlib.sha256()
    for name, text in docs:
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


def _module_docstrings() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_PARTS.intersection(rel.parts):
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        if not doc:
            continue
        # Indented lines in module docstrings are mostly API listings ("match  Match a regular
        # expression...") that paraphrase function docstrings, i.e. the Q&A answers: keep prose only.
        prose = "\n".join(line for line in doc.splitlines() if not line[:1].isspace())
        prose = _clean(prose)
        if len(prose) >= 200:
            docs.append((f"stdlib/{rel.as_posix()}", prose))
    return docs


def _clean(text: str) -> str:
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _split_tail(text: str, fraction: float) -> tuple[str, str]:
    """Split at the paragraph boundary nearest to (1 - fraction) of the text; short texts stay whole."""
    if len(text) < 2000:
        return text, ""
    target = int(len(text) * (1 - fraction))
    cut = text.rfind("\n\n", 0, target)
    if cut <= 0:
        cut = text.rfind("\n", 0, target)
    if cut <= 0:
        return text, ""
    return text[:cut].strip(), text[cut:].strip()


def train_tokenizer(texts: list[str], tiny: TinyBaseConfig) -> Any:
    """Byte-level BPE (every string encodes, decode round-trips) wrapped as a transformers tokenizer.

    Args:
        texts: the training documents only (never the held-out tails).
        tiny: reads `vocab_size` and `max_position_embeddings`.

    Returns:
        A `PreTrainedTokenizerFast` with `<unk> <s> </s> <pad>` as ids 0..3, the template markers as
        single tokens, BOS added to every sequence, and the Llama-2 chat template.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = [UNK, BOS, EOS, PAD]  # ids 0..3, in this order
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
    # BOS on every sequence, never EOS: the answer's EOS comes from the template (prompting.py).
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
