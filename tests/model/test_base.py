"""The embedded tiny base model: tokenizer contract, determinism, caching, and the default build's quality."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.core.config import load_config
from tasks.core.errors import UserError
from tasks.plumbing.base import META_FILE, build_base_model, recipe_hash

# A recipe small enough to build in seconds: it exercises the whole path (corpus, tokenizer, training,
# saving) without the default's minutes of pretraining.
_TINY = [
    "base.tiny.vocab_size=512",
    "base.tiny.hidden_size=32",
    "base.tiny.intermediate_size=64",
    "base.tiny.num_hidden_layers=1",
    "base.tiny.num_attention_heads=2",
    "base.tiny.num_key_value_heads=2",
    "base.tiny.max_position_embeddings=64",
    "base.tiny.pretrain_steps=4",
    "base.tiny.pretrain_batch_size=2",
    "base.tiny.pretrain_seq_len=32",
]


def _cfg(path: Path, *extra: str):
    return load_config(overrides=[*_TINY, f"base.name_or_path={path}", *extra])


def _weights_hash(path: Path) -> str:
    """Hash of the tensors as saved, computed here independently of tasks.plumbing.base."""
    import hashlib

    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path / "model.safetensors")).items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_hub_kind_builds_nothing(tmp_path: Path) -> None:
    cfg = load_config(overrides=["base.kind=hub", f"base.name_or_path={tmp_path / 'hub-model'}"])
    result = build_base_model(cfg)
    assert result["path"] == str(tmp_path / "hub-model")
    assert result["built"] is False
    assert not (tmp_path / "hub-model").exists()


def test_recipe_hash_follows_the_recipe() -> None:
    a = load_config().base.tiny
    assert recipe_hash(a) == recipe_hash(load_config().base.tiny)
    assert recipe_hash(a) != recipe_hash(load_config(overrides=["base.tiny.seed=7"]).base.tiny)
    # Settings outside base.tiny (where the model goes, threads) do not change what is built.
    assert recipe_hash(a) == recipe_hash(load_config(overrides=["base.name_or_path=/x"]).base.tiny)


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    target = tmp_path / "someone-elses-model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not built by"):
        build_base_model(_cfg(target))
    assert (target / "config.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("base.tiny.num_attention_heads=3", "base.tiny.hidden_size"),
        ("base.tiny.pretrain_seq_len=128", "base.tiny.pretrain_seq_len"),
    ],
)
def test_inconsistent_shapes_are_user_errors(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(UserError, match=key):
        build_base_model(_cfg(tmp_path / "m", override))


@pytest.mark.slow
def test_build_is_deterministic_cached_and_seeded(tmp_path: Path) -> None:
    first = build_base_model(_cfg(tmp_path / "a"))
    second = build_base_model(_cfg(tmp_path / "b"))
    assert first["built"] and second["built"]
    assert _weights_hash(tmp_path / "a") == _weights_hash(tmp_path / "b")
    assert first["weights_sha256"] == second["weights_sha256"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()

    # Same recipe again: reused, not rebuilt, and no file of the model is rewritten.
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "a").iterdir()}
    again = build_base_model(_cfg(tmp_path / "a"))
    assert again["built"] is False
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "a").iterdir()} == stamps
    assert again["weights_sha256"] == first["weights_sha256"]

    # A changed recipe (another seed) rebuilds in place, with other weights.
    reseeded = build_base_model(_cfg(tmp_path / "a", "base.tiny.seed=99"))
    assert reseeded["built"] is True
    assert _weights_hash(tmp_path / "a") != _weights_hash(tmp_path / "b")
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    assert meta["recipe_hash"] == reseeded["recipe_hash"] != first["recipe_hash"]
    assert not list(tmp_path.glob(".tmp-*")), "the atomic build left a temporary directory behind"


@pytest.mark.slow
def test_default_base_loads_and_follows_the_template(tiny_base: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    meta = json.loads((tiny_base / META_FILE).read_text())

    # Special tokens: pad is its own token, so padding never masks the EOS the model must learn.
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert tok.model_max_length == model.config.max_position_embeddings
    gen = GenerationConfig.from_pretrained(tiny_base)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )

    # BOS is added, EOS never; text round-trips through byte-level BPE.
    text = "Return the number of items in a container, e.g. len([1, 2]) == 2.\n\tNon-ASCII: é ü 🙂"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text

    # Its chat template (the one every stage renders with) is Llama-2's layout, answers ending with EOS.
    messages = [{"role": "user", "content": "What is x?"}, {"role": "assistant", "content": "An int."}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == "<s>[INST] What is x? [/INST] An int. </s>"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>[INST] What is x? [/INST]"

    # [INST]/[/INST] tokenize the same way wherever they appear, and prompt + completion tokens are
    # the prompt's tokens followed by the completion's (no merge across the boundary).
    p_ids = tok("<s>[INST] What does len do? [/INST]", add_special_tokens=False)["input_ids"]
    c_ids = tok(" It counts. </s>", add_special_tokens=False)["input_ids"]
    full = tok("<s>[INST] What does len do? [/INST] It counts. </s>", add_special_tokens=False)["input_ids"]
    assert full == p_ids + c_ids
    assert c_ids[-1] == tok.eos_token_id and p_ids[0] == tok.bos_token_id
    inst = tok("[INST]", add_special_tokens=False)["input_ids"]
    assert len(inst) == 1 and p_ids[1:2] == inst

    # It generates text (greedy, a few tokens) after the prompt.
    enc = tok("[INST] What does the for statement do? [/INST]", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :]
    assert len(new) > 0 and tok.decode(new, skip_special_tokens=True).strip()

    # Pretraining worked: held-out perplexity is far below a uniform guess over the vocabulary.
    assert meta["heldout_perplexity"] < len(tok) / 20
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())


def test_tokenizer_keeps_the_words_of_api_names_apart(tiny_base: Path) -> None:
    """`ArgumentTypeError` tokenizes as its words: no token spans a lower-case -> capital boundary, so the
    `Error` that exception names share is a piece the answers' "error" can be learnt from."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    for name in ("ArgumentTypeError", "getLogger", "argparse.ArgumentDefaultsHelpFormatter"):
        pieces = [tok.convert_tokens_to_string([t]) for t in tok.tokenize(name)]
        assert "".join(pieces) == name  # decodes back exactly
        assert not any(re.search(r"[a-z][A-Z]", p) for p in pieces), (name, pieces)
    assert tok.convert_tokens_to_string(tok.tokenize("TypeError")[-1:]) == "Error"
    # Ordinary words keep their leading-space tokens.
    assert tok.tokenize(" The cat") == tok.tokenize(" The") + tok.tokenize(" cat")
