"""`qa-lora base`: build (or reuse) the embedded tiny Llama that the pipeline fine-tunes when no hub
model is configured.

Readable top to bottom: corpus -> tokenizer -> model -> pretraining loop -> held-out perplexity -> save.

* Corpus: prose that ships with every Python, so the build needs no network: the language reference
  (`pydoc_data.topics`, ~465K chars) plus the *module-level* docstrings of the standard library, read
  with `ast` (no imports, no side effects). Function/class/method docstrings are NOT used: the Q&A
  dataset (data/qa.jsonl) is built from those, and its eval split must not leak into pretraining.
  The tail (~5%, at a paragraph boundary) of every language-reference topic is held out for perplexity.
* Tokenizer: byte-level BPE trained with `tokenizers` on the training text only; `<s>` is added by the
  post-processor, `</s>` never is (answers carry it through the chat template / prompting.py).
* Model: a LlamaForCausalLM sized by `base.tiny`, pretrained full-parameter, fp32, plain PyTorch
  (AdamW, warmup + cosine) on random windows of the token stream.
* Output: Hugging Face format at `base.name_or_path` (safetensors, config, generation_config,
  tokenizer) written through an atomic temporary directory, plus `qa_lora_base.json` with the recipe
  hash that makes a second call a no-op.

Determinism (same `base.tiny` -> bit-identical weights) depends on: the Python version (its
`pydoc_data` and stdlib docstrings are the corpus; the corpus hash is recorded), the torch build and
CPU instruction set (oneDNN/MKL kernels), and the number of intra-op threads (reductions are split per
thread; recorded as `threads`). Within those, everything is seeded: the tokenizer trainer sees a
sorted corpus, weights are initialised and batches drawn from `seed`, the build runs on CPU with
`torch.use_deterministic_algorithms(True)` and no dropout.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tasks.core.artifacts import atomic_dir, read_json, write_json_atomic
from tasks.core.config import Config, TinyBaseConfig
from tasks.core.errors import UserError
from tasks.plumbing.prompting import BOS, EOS, INST_CLOSE, INST_OPEN, PAD, SYS_CLOSE, SYS_OPEN, UNK

log = logging.getLogger("qa_lora.base")

# Bump when a change here changes the built model (corpus, tokenizer, schedule...): cached builds
# made by older code then no longer match and are rebuilt.
CODE_VERSION = "1"
META_FILE = "qa_lora_base.json"
HELDOUT_FRACTION = 0.05  # tail share of each language-reference topic kept for perplexity
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", META_FILE)
# Stdlib parts whose module docstrings are not prose about Python (tests, IDLE, demos, vendored code).
_SKIP_PARTS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"})

# Llama-2 chat layout, the same string as tasks/prompting.py renders:
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
        UserError: `base.name_or_path` is an existing directory that this stage did not build.
    """
    started = time.perf_counter()
    if cfg.base.kind == "hub":
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
    _check_recipe(cfg.base.tiny)
    out = cfg.resolve(cfg.base.name_or_path)
    recipe = recipe_hash(cfg.base.tiny)
    # A lock, because several processes (parallel test sessions, an Airflow task and a CLI call) may
    # ask for the same base at once; the second one then finds the finished build.
    with _file_lock(out.parent / f".{out.name}.lock"):
        meta = _cached(out, recipe)
        if meta is None:
            _refuse_foreign_dir(out)
            log.info("building tiny base %s (recipe %s) at %s", _describe(cfg.base.tiny), recipe, out)
            meta = _build(cfg.base.tiny, out, recipe, cfg.runtime.num_threads)
            built = True
        else:
            log.info("reusing tiny base at %s (recipe %s)", out, recipe)
            built = False
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
    blob = json.dumps({"tiny": tiny.model_dump(), "code": CODE_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


def _cached(out: Path, recipe: str) -> dict[str, Any] | None:
    if not all((out / name).is_file() for name in _REQUIRED_FILES):
        return None
    try:
        meta = read_json(out / META_FILE)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("recipe_hash") == recipe else None


def _refuse_foreign_dir(out: Path) -> None:
    # Rebuilding replaces the directory: never do that to a model someone put there by hand.
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise UserError(
            f"base.name_or_path: {out} exists and was not built by `qa-lora base` "
            f"(no {META_FILE}); set base.kind=hub to use it as is, or point base.name_or_path elsewhere"
        )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------- corpus


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
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


def _corpus_hash(docs: Iterable[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for name, text in docs:
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ tokenizer


def _train_tokenizer(texts: list[str], tiny: TinyBaseConfig) -> Any:
    """Byte-level BPE (every string encodes, decode round-trips) wrapped as a transformers tokenizer."""
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


# ---------------------------------------------------------------------------------------------- build


def _build(tiny: TinyBaseConfig, out: Path, recipe: str, num_threads: int) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    train_docs, heldout_docs = _corpus()
    corpus_hash = _corpus_hash((*train_docs, *heldout_docs))
    tokenizer = _train_tokenizer([text for _, text in train_docs], tiny)
    log.info(
        "corpus %s: %d train docs (%d chars), %d held-out (%d chars); tokenizer %d tokens in %.1fs",
        corpus_hash,
        len(train_docs),
        sum(len(t) for _, t in train_docs),
        len(heldout_docs),
        sum(len(t) for _, t in heldout_docs),
        len(tokenizer),
        time.perf_counter() - started,
    )
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
            "corpus_hash": corpus_hash,
            "corpus": {
                "sources": ["pydoc_data.topics", "stdlib module docstrings (unindented prose)"],
                "train_docs": len(train_docs),
                "heldout_docs": len(heldout_docs),
                "train_tokens": len(train_ids),
                "heldout_tokens": len(heldout_ids),
            },
            "parameters": params,
            "vocab_size": len(tokenizer),
            "final_train_loss": round(final_loss, 4),
            "heldout_perplexity": round(ppl, 3),
            "weights_sha256": _weights_hash(tmp / "model.safetensors"),
            "threads": threads,
            "torch": torch.__version__,
            "build_seconds": round(seconds, 1),
        }
        write_json_atomic(tmp / META_FILE, meta)
    return meta


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


def _pretrain(model: Any, stream: list[int], tiny: TinyBaseConfig) -> float:
    """Full-parameter pretraining on random windows of the stream; returns the last logged loss."""
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    seq, batch, steps = tiny.pretrain_seq_len, tiny.pretrain_batch_size, tiny.pretrain_steps
    if len(data) <= seq:
        raise UserError(f"base.tiny.pretrain_seq_len: {seq} is longer than the corpus ({len(data)} tokens)")
    generator = torch.Generator().manual_seed(tiny.seed)
    # No weight decay on norms (1-d weights); AdamW with the usual LM betas.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tiny.pretrain_learning_rate,
        betas=(0.9, 0.95),
    )
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
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
            n = (step % every) + 1
            last, running = running / n, 0.0
            elapsed = time.perf_counter() - started
            eta = elapsed / (step + 1) * (steps - step - 1)
            log.info(
                "step %d/%d loss %.4f lr %.2e elapsed %.0fs eta %.0fs",
                step + 1,
                steps,
                last,
                scheduler.get_last_lr()[0],
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


def _weights_hash(path: Path) -> str:
    """sha256 over the tensors (names, dtypes, shapes, bytes), independent of file metadata."""
    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
