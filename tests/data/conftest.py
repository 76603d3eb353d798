"""Fixtures for the data tests: a tiny fixture tokenizer, writers for bad files, a config factory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasks.core.config import Config, load_config
from tasks.plumbing.tiny_corpus import BOS, CHAT_TEMPLATE, EOS, INST_CLOSE, INST_OPEN, PAD, UNK

_CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "How do I open a file in Python? Use the open() built-in function.",
    "What does the json module do? It encodes and decodes JSON documents.",
    "Which keyword defines a function? The def keyword defines a function.",
] * 4


def build_fixture_tokenizer(out: Path) -> Path:
    """A tiny byte-level BPE saved as a PreTrainedTokenizerFast with the template's special tokens.

    Built like tasks/base.py's tokenizer (same specials, BOS added, EOS only from the template, the same
    chat template), so the validation checks see what they will see with the real tiny base, in well
    under a second.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.add_tokens([AddedToken(INST_OPEN, normalized=False), AddedToken(INST_CLOSE, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # A one-layer random Llama beside it: the stages resolve the base as a model directory
    # (config.json + safetensors, tasks.plumbing.loading.resolve_base) before loading its tokenizer.
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2}
    LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), num_hidden_layers=1, **shape)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def fixture_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture tokenizer, built once per session."""
    return build_fixture_tokenizer(tmp_path_factory.mktemp("fixture-tokenizer"))


@pytest.fixture
def make_cfg(tmp_path: Path, fixture_tokenizer: Path) -> Callable[..., Config]:
    """Config for a data file under tmp_path, the fixture tokenizer, small row bounds; extra overrides."""

    def make(source: Path, *overrides: tuple[str, Any]) -> Config:
        return load_config(
            overrides=[
                ("data.source", str(source)),
                ("data.allowed_roots", [str(tmp_path)]),
                ("data.min_rows", 5),
                ("data.eval_fraction", 0.2),
                ("base.name_or_path", str(fixture_tokenizer)),
                ("base.kind", "hub"),
                ("data.dvc_remote", str(tmp_path / "remote")),
                # a tokenizer without a model or corpus: no general text (forgetting rule, replay)
                ("gate.max_general_ppl_increase", None),
                ("train.replay_ratio", 0.0),
                *overrides,
            ]
        )

    return make
