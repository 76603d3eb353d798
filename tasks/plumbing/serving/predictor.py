"""Questions in, answers out, on the ONNX export alone: numpy, onnxruntime and `tokenizers` (no torch, no
transformers), so that a registry consumer or `mlflow models serve` runs it in a small environment.

The decode loop is the project's one generator (:class:`tasks.plumbing.onnx_generate.OnnxGenerator`); this
module gives it a tokenizer read from `tokenizer.json` with the `tokenizers` library in place of
transformers' AutoTokenizer, and checks requests against the limits recorded with the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.errors import UserError
from tasks.plumbing.onnx_generate import LAYOUT_FILE, OnnxGenerator

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class ServingLimits:
    """What one request may ask for; recorded in the MLmodel (metadata) and enforced by :class:`Answerer`."""

    default_max_new_tokens: int = 64
    max_new_tokens: int = 256
    max_batch_rows: int = 16
    max_question_chars: int = 2000

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ServingLimits:
        """Limits from a model config / metadata dict (unknown keys ignored, missing keys defaulted)."""
        known = {k: int(v) for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


class FastTokenizer:
    """The slice of a transformers tokenizer that :class:`OnnxGenerator` calls, over `tokenizers` alone.

    Prompts are rendered by the chat format, special tokens included, so encoding adds none; batches
    are left-padded with the export's pad token id (`onnx_layout.json`).
    """

    def __init__(self, path: Path, pad_token_id: int) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_truncation()
        self._tok.enable_padding(direction="left", pad_id=pad_token_id)
        self.pad_token_id = pad_token_id
        self.padding_side = "left"

    def __call__(
        self,
        texts: Sequence[str],
        padding: bool = True,
        return_tensors: str = "np",
        add_special_tokens: bool = False,
    ) -> dict[str, Any]:
        """Left-padded `input_ids` and `attention_mask` (numpy int64) for a batch of rendered prompts."""
        encoded = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        }

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class Answerer:
    """Greedy answers to plain questions (rendered by the export's chat format), within :class:`ServingLimits`.

    Refuses an export whose chat format is not the one the model was registered with (`chat_fingerprint`),
    or whose tokenizer maps the format's special tokens to other ids: its prompts and stop tokens would
    not be the ones the model was trained on.
    """

    def __init__(
        self,
        onnx_dir: str | Path,
        limits: ServingLimits | None = None,
        provider: str = "auto",
        chat_fingerprint: str | None = None,
    ) -> None:
        onnx_dir = Path(onnx_dir)
        layout_path = onnx_dir / LAYOUT_FILE
        tok_path = onnx_dir / TOKENIZER_FILE
        for path in (layout_path, tok_path):
            if not path.is_file():
                raise UserError(f"{path}: missing; expected an ONNX export written by `qa-lora export`")
        pad = json.loads(layout_path.read_text(encoding="utf-8"))["pad_token_id"]
        self.tokenizer = FastTokenizer(tok_path, int(pad))
        self.generator = OnnxGenerator(onnx_dir, provider=provider, tokenizer=self.tokenizer)
        self.generator.chat.check_tokenizer(self.tokenizer.token_to_id, onnx_dir, chat_fingerprint)
        self.limits = limits or ServingLimits()

    def check(self, questions: Sequence[Any], max_new_tokens: int) -> None:
        """Refuse a request outside the limits.

        Raises:
            UserError: one line naming the field, the offending row or value, and the limit.
        """
        lim = self.limits
        if not 1 <= max_new_tokens <= lim.max_new_tokens:
            raise UserError(f"params.max_new_tokens={max_new_tokens}: expected 1..{lim.max_new_tokens}")
        if not questions:
            raise UserError("question: no rows; expected 1 or more questions")
        if len(questions) > lim.max_batch_rows:
            raise UserError(f"question: {len(questions)} rows; at most {lim.max_batch_rows} per request")
        for i, q in enumerate(questions):
            if not isinstance(q, str):
                raise UserError(f"question[{i}]: got type {type(q).__name__}; expected a string")
            if not q.strip():
                raise UserError(f"question[{i}]: empty; expected a non-empty string")
            if len(q) > lim.max_question_chars:
                raise UserError(
                    f"question[{i}]: {len(q)} characters; at most {lim.max_question_chars} per question"
                )

    def answer(self, questions: Sequence[Any], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers, one per question, token for token what `OnnxGenerator.generate` gives.

        Args:
            questions: plain questions (the prompt template is applied here).
            max_new_tokens: per-answer token budget; default `limits.default_max_new_tokens`.

        Raises:
            UserError: the request is outside the limits (see :meth:`check`).
        """
        budget = self.limits.default_max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        self.check(questions, budget)
        prompts = [self.generator.chat.prompt(q) for q in questions]
        return self.generator.generate(prompts, max_new_tokens=budget).texts
