"""Per-row facts that an expectation cannot compute itself, as columns the GX suite then checks.

Token length of the example as the base's chat template renders it (tasks/plumbing/chat.py), whether it
ends with the template's end-of-turn token (or why the template refuses the row), control sequences (the
tokenizer's special and added tokens, the template's markers) inside user text, the line of an earlier
exact duplicate, the line of an earlier near-duplicate, and the split a row goes to.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tasks.core.config import Config
from tasks.plumbing.chat import ChatError, ChatFormat, chat_format
from tasks.plumbing.dataio import dialogue_key
from tasks.stages.validate.near_duplicates import near_duplicates

# Row-level checks, in the order a row is attributed to one of them (the first it fails).
ROW_CHECKS = ("blank", "control_tokens", "too_long", "missing_eos", "duplicate", "near_duplicate")


def row_facts(frame: Any, tokenizer: Any, cfg: Config) -> Any:
    """Add the per-row columns the suite checks: lengths, EOS, control sequences, duplicates, split.

    Args:
        frame: one row per input row (line, id, question, answer, category, system, history); changed
            in place.
        tokenizer: the base model's tokenizer, with the chat template the pipeline renders with.
        cfg: reads `train.max_length` and `data` (near_duplicate_threshold, split_salt, eval_fraction,
            system_prompt).

    Returns:
        The same frame with the columns the GX suite names.
    """
    present = frame["question"].notna() & frame["answer"].notna()
    present &= frame["question"].fillna("").str.strip().ne("") & frame["answer"].fillna("").str.strip().ne("")
    frame["question_norm"] = [
        dialogue_key(q, h if isinstance(h, list) else None) if q else None
        for q, h in zip(frame["question"], frame["history"], strict=True)
    ]
    chat = chat_format(cfg, tokenizer)
    _add_control_sequences(frame, chat, present)
    _add_token_facts(frame, chat, present)
    # Exact and near duplicates among rows that pass the content checks, first occurrence kept (a
    # bad first copy must not take a good second copy down with it).
    content_ok = (
        present
        & frame["control_sequences"].isna()
        & (frame["n_tokens"] <= cfg.train.max_length)
        & frame["ends_with_eos"].fillna(False).astype(bool)
    )
    _add_duplicates(frame, content_ok)
    _add_near_duplicates(frame, content_ok & frame["duplicate_of"].isna(), cfg.data.near_duplicate_threshold)
    frame["split"] = [
        split_of(qn, cfg.data.split_salt, cfg.data.eval_fraction) if qn else None
        for qn in frame["question_norm"]
    ]
    frame["in_both_splits"] = in_both_splits(frame)
    return frame


def _add_control_sequences(frame: Any, chat: ChatFormat, present: Any) -> None:
    def user_text(row: Any) -> str:
        turns = [t["content"] for t in row.history] if isinstance(row.history, list) else []
        system = row.system if isinstance(row.system, str) else ""
        return "\n".join([system, *turns, row.question, row.answer])

    frame["control_sequences"] = [
        ", ".join(chat.find_markers(user_text(row))) or None if ok else None
        for row, ok in zip(frame.itertuples(index=False), present, strict=True)
    ]


def _add_token_facts(frame: Any, chat: ChatFormat, present: Any) -> None:
    """n_tokens and ends_with_eos of each rendered example; template_error where the template refuses it."""
    texts, rendered, errors = [], [], {}
    columns = ["question", "answer", "system", "history"]
    for idx, row in zip(frame.index[present], frame.loc[present, columns].to_dict("records"), strict=True):
        try:
            texts.append(chat.example(row)[0])
            rendered.append(idx)
        except ChatError as exc:
            errors[idx] = str(exc)
    ids = chat.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    frame["n_tokens"] = float("nan")
    frame.loc[rendered, "n_tokens"] = [float(len(x)) for x in ids]
    frame["ends_with_eos"] = None
    frame.loc[present, "ends_with_eos"] = False
    frame.loc[rendered, "ends_with_eos"] = [bool(x) and x[-1] == chat.end_of_turn_id for x in ids]
    frame["template_error"] = None
    for idx, error in errors.items():
        frame.at[idx, "template_error"] = error
    frame.attrs["end_of_turn"] = chat.end_of_turn
    frame.attrs["chat"] = chat.describe()


def _add_duplicates(frame: Any, candidates: Any) -> None:
    frame["duplicate_of"] = None
    frame["duplicate_kind"] = None
    seen_q: dict[str, int] = {}
    seen_id: dict[str, int] = {}
    for idx in frame.index[candidates]:
        line, qn, rid = int(frame.at[idx, "line"]), frame.at[idx, "question_norm"], frame.at[idx, "id"]
        if qn in seen_q:
            frame.at[idx, "duplicate_of"] = seen_q[qn]
            frame.at[idx, "duplicate_kind"] = "question"
        elif rid in seen_id:
            frame.at[idx, "duplicate_of"] = seen_id[rid]
            frame.at[idx, "duplicate_kind"] = "id"
        else:
            seen_q[qn] = line
            seen_id[rid] = line


def _add_near_duplicates(frame: Any, candidates_mask: Any, threshold: float) -> None:
    frame["near_duplicate_of"] = None
    frame["near_duplicate_score"] = float("nan")
    candidates = frame.index[candidates_mask]
    matches = near_duplicates([frame.at[i, "question_norm"] for i in candidates], threshold)
    for pos, (other, score) in matches.items():
        idx = candidates[pos]
        frame.at[idx, "near_duplicate_of"] = int(frame.at[candidates[other], "line"])
        frame.at[idx, "near_duplicate_score"] = score


def split_of(question_norm: str, salt: str, eval_fraction: float) -> str:
    """`eval` or `train`, from a hash of the question alone: adding other rows never moves this one."""
    digest = hashlib.sha256(f"{salt}\x00{question_norm}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


def in_both_splits(frame: Any) -> list[bool]:
    """Per row: whether its normalized question occurs in both splits (the overlap check's column)."""
    splits: dict[str, set[str]] = {}
    for qn, split in zip(frame["question_norm"], frame["split"], strict=True):
        if qn:
            splits.setdefault(qn, set()).add(split)
    return [bool(qn) and len(splits[qn]) > 1 for qn in frame["question_norm"]]


def failure_details(frame: Any, cfg: Config) -> dict[str, dict[int, str]]:
    """Check -> line -> why that row fails it (the human reason in errors and in the drop list)."""
    out: dict[str, dict[int, str]] = {check: {} for check in ROW_CHECKS}
    out["train_eval_overlap"] = {}
    for row in frame.itertuples(index=False):
        line = int(row.line)
        blank = [c for c in ("question", "answer") if not (getattr(row, c) or "").strip()]
        if blank:
            out["blank"][line] = f"{' and '.join(blank)} {'is' if len(blank) == 1 else 'are'} empty or null"
        if row.control_sequences:
            out["control_tokens"][line] = f"user text contains control sequence(s) {row.control_sequences}"
        if row.n_tokens == row.n_tokens:  # not NaN
            out["too_long"][line] = (
                f"{int(row.n_tokens)} tokens after the prompt template, over train.max_length={cfg.train.max_length}"
            )
        out["missing_eos"][line] = row.template_error or (
            f"the rendered example does not end with the end-of-turn token {frame.attrs.get('end_of_turn')}"
        )
        if row.duplicate_of is not None:
            what = "question" if row.duplicate_kind == "question" else "id"
            out["duplicate"][line] = f"duplicate {what} of line {int(row.duplicate_of)}"
        if row.near_duplicate_of is not None:
            out["near_duplicate"][line] = (
                f"near-duplicate question of line {int(row.near_duplicate_of)} "
                f"(word 3-gram Jaccard {row.near_duplicate_score:.2f} >= {cfg.data.near_duplicate_threshold})"
            )
        out["train_eval_overlap"][line] = "the question is in both train and eval"
    return out
