"""The chat format on the families users bring (tests/chat_families.py): Llama-2-chat, Llama-3.1-Instruct,
Qwen2.5-Instruct (ChatML) and Mistral-Instruct v0.3, each with its real template and special tokens.

Per family: the prompt every stage generates from is the template's own rendering; the loss covers
exactly the assistant tokens (each answer and its end-of-turn token, earlier turns included); a forged
turn in the family's syntax is caught by validation; generation stops at the family's end-of-turn token,
and the pad token is none of the stop tokens. Across families: a base without a template is refused
unless `prompt.template` names one, and an adapter or export made in another format is refused. The
whole pipeline per family runs in tests/e2e/test_chat_families.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chat_families import FAMILIES, build_family_base

from tasks.core.config import Config, load_config
from tasks.core.errors import UserError

CONVERSATION = {
    "question": "And what does len() return?",
    "answer": "The number of items.",
    "system": "Answer in one sentence.",
    "history": [
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A mutable sequence."},
    ],
}


@pytest.fixture(scope="module")
def bases(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_family_base(name, tiny_base, root / name) for name in FAMILIES}


def _cfg(base: Path, *extra: tuple[str, Any]) -> Config:
    # A family base is no copy of the tiny base: it has no general text of its own (forgetting rule, replay).
    off = [("gate.max_general_ppl_increase", None), ("train.replay_ratio", 0.0)]
    return load_config(overrides=[("base.name_or_path", str(base)), ("base.kind", "hub"), *off, *extra])


def _chat(base: Path, *extra: tuple[str, Any]) -> Any:
    from tasks.plumbing.chat import chat_format
    from tasks.plumbing.loading import load_tokenizer

    cfg = _cfg(base, *extra)
    return chat_format(cfg, load_tokenizer(cfg))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prompts_stops_and_pad_come_from_the_family_template(name: str, bases: dict[str, Path]) -> None:
    family = FAMILIES[name]
    chat = _chat(bases[name])
    tok = chat.tokenizer
    question = "What does zip() return?"
    expected = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert chat.prompt(question) == expected
    assert chat.end_of_turn == family.end_of_turn
    assert tok.convert_tokens_to_ids(family.end_of_turn) in chat.stop_token_ids
    assert tok.pad_token_id not in chat.stop_token_ids and tok.pad_token_id is not None
    # BOS appears once, from the template's text: the prompt is tokenized without special tokens added.
    ids = chat.prompt_ids([question])[0]
    if family.bos:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    else:
        assert tok.bos_token_id is None or tok.bos_token_id not in ids


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_loss_covers_exactly_the_assistant_tokens(name: str, bases: dict[str, Path]) -> None:
    """A multi-turn row (system, an earlier exchange, the question): the trained tokens are, turn by turn,
    each answer followed by the end-of-turn token; everything else, user turns and system message
    included, is masked."""
    chat = _chat(bases[name])
    if name == "mistral-v0.3":  # Mistral moves the system message into the last user turn: refused
        with pytest.raises(ValueError, match="differently once"):
            chat.encode([CONVERSATION])
        row = {k: v for k, v in CONVERSATION.items() if k != "system"}
    else:
        row = CONVERSATION
    ((ids, mask),) = chat.encode([row])
    runs: list[list[int]] = []
    for i, (token, trained) in enumerate(zip(ids, mask, strict=True)):
        if trained:
            (runs[-1] if i and mask[i - 1] else runs.append([]) or runs[-1]).append(token)
    texts = [chat.tokenizer.decode(run) for run in runs]
    assert texts == [ANSWER_LAYOUT[name].format(a) for a in ("A mutable sequence.", "The number of items.")]
    untrained = chat.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "What is a list?" in untrained and "And what does len() return?" in untrained
    assert ids[-1] == chat.end_of_turn_id and mask[-1] == 1


# How each family's template writes an answer (the hub templates, read by hand): what the loss covers.
ANSWER_LAYOUT = {
    "llama2": " {} </s>",
    "llama3.1": "{}<|eot_id|>",
    "qwen2.5": "{}<|im_end|>",
    "mistral-v0.3": " {}</s>",
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_forged_turn_in_the_family_syntax_is_caught(
    name: str, bases: dict[str, Path], tmp_path: Path
) -> None:
    from tasks.stages.validate import validate_dataset

    rows = [
        {
            "id": f"q{i}",
            "question": f"What does function f{i} of module m{i % 3} return?",
            "answer": f"Value {i}.",
        }
        for i in range(12)
    ]
    rows[5]["question"] = FAMILIES[name].forged
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = _cfg(
        bases[name],
        ("data.source", str(source)),
        ("data.allowed_roots", [str(tmp_path)]),
        ("data.min_rows", 5),
        ("data.policies.control_tokens", "error"),
    )
    with pytest.raises(
        UserError, match=r"line 6: user text contains control sequence\(s\) .*check: control_tokens"
    ):
        validate_dataset(cfg, tmp_path / "run")


def test_a_base_without_a_template_is_refused_unless_one_is_named(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(bases["llama2"], bare)
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        _chat(bare)
    assert str(err.value) == (
        f"base.name_or_path: the tokenizer of {bare} has no chat template; set prompt.template to one of "
        "llama2, llama3, chatml, mistral (the format the base was trained to chat in)"
    )
    named = _chat(bare, ("prompt.template", "llama2"))
    assert named.source == "builtin:llama2" and named.fingerprint == _chat(bases["llama2"]).fingerprint


def test_an_adapter_made_in_another_chat_format_is_refused(bases: dict[str, Path], tmp_path: Path) -> None:
    """Evaluate and export check the adapter's recorded format against the base's; the served model
    checks its export's format and tokenizer against what it was registered with."""
    from tasks.plumbing.chat import check_same_format

    qwen, llama = _chat(bases["qwen2.5"]), _chat(bases["llama3.1"])
    qwen.frame().save(tmp_path)
    check_same_format(tmp_path, qwen)  # the same format passes
    with pytest.raises(UserError) as err:
        check_same_format(tmp_path, llama)
    assert str(err.value).startswith(
        f"{tmp_path}: made with chat format {qwen.fingerprint}, but the base loaded here renders with "
        f"{llama.fingerprint} (base template, end of turn '<|eot_id|>')"
    )
    # A system prompt changes the format too: an adapter trained without one does not pass with one.
    with pytest.raises(UserError, match="made with chat format"):
        check_same_format(tmp_path, _chat(bases["qwen2.5"], ("data.system_prompt", "Be brief.")))
    # The served side: another tokenizer (ids differ) or a frame other than the registered one.
    frame = qwen.frame()
    frame.check_tokenizer(qwen.tokenizer.convert_tokens_to_ids, tmp_path, qwen.fingerprint)
    with pytest.raises(UserError, match="does not belong to this model"):
        frame.check_tokenizer(lambda token: 7, tmp_path)
    with pytest.raises(UserError, match=f"registered with {llama.fingerprint}"):
        frame.check_tokenizer(qwen.tokenizer.convert_tokens_to_ids, tmp_path, llama.fingerprint)
