"""The chat format every stage renders with: the base tokenizer's own chat template.

A chat base is fine-tuned in the format it chats in: Llama-2's `[INST]`, Llama-3's header tokens and
`<|eot_id|>`, ChatML's `<|im_start|>`/`<|im_end|>`, Mistral's `[INST]` without a BOS per turn. So no
stage formats text itself. :class:`ChatFormat` renders a row with `tokenizer.apply_chat_template` (the
template the base ships, or a built-in one named by `prompt.template`) and derives from that rendering:

* the prompt a model is given (`add_generation_prompt=True`), the same in evaluation and export;
* the end-of-turn token (the first special token the template writes after an answer) and the stop
  tokens generation ends on;
* the training sequence: the prompt's tokens, then the answer's up to and including the end-of-turn
  token, with the loss on the assistant turns only (earlier turns of a multi-turn row too);
* the control sequences that must not occur in user text (the tokenizer's special and added tokens and
  the template's own markers), so a row cannot forge a turn;
* a fingerprint of the template, the system prompt and the special tokens, recorded with every adapter
  and export and checked wherever one is loaded on a base.

:class:`ChatFrame` is what the served model needs of this, as plain strings (no jinja, no transformers):
the text before and after the question in a prompt, the stop token ids and the fingerprint material.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.errors import UserError

if TYPE_CHECKING:  # the served model imports this module without pydantic (tasks.core.config)
    from tasks.core.config import Config

CHAT_FILE = "chat_format.json"  # beside an adapter and an ONNX export
TEMPLATES_DIR = Path(__file__).with_name("chat_templates")
BUILTIN_TEMPLATES = ("llama2", "llama3", "chatml", "mistral")

# Stand-ins for a question and an answer while the template's frame is read off a rendering. Private-use
# code points: no template branches on them and no tokenizer treats them as markup.
_Q = "\ue000QUESTION\ue001"
_A = "\ue000ANSWER\ue001"
# Literal markers inside a template's source: <|im_start|>, [INST], [/INST], <<SYS>>, <</SYS>>, ...
_MARKER_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>|\[/?[A-Z][A-Z_]+\]|<</?[A-Z]+>>")


class ChatError(ValueError):
    """A row the chat template cannot render as a training example (validation reports it by line)."""


def builtin_template(name: str) -> str:
    """The source of a built-in chat template (`prompt.template`), verbatim from its model's hub files."""
    if name not in BUILTIN_TEMPLATES:
        raise UserError(
            f"prompt.template: {name!r} is not a built-in template; expected one of {BUILTIN_TEMPLATES}"
        )
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def use_template(tokenizer: Any, template: str, source: str) -> str:
    """Give `tokenizer` the chat template the pipeline renders with; returns where it came from.

    Args:
        tokenizer: a transformers tokenizer (changed in place when a built-in template is named).
        template: `prompt.template`: "auto" (the tokenizer's own) or a built-in name.
        source: the base's name, for the message.

    Raises:
        UserError: "auto" and the tokenizer has no chat template.
    """
    if template != "auto":
        tokenizer.chat_template = builtin_template(template)
        return f"builtin:{template}"
    own = tokenizer.chat_template
    if isinstance(own, Mapping):  # several named templates: the default one renders chats
        own = own.get("default")
        tokenizer.chat_template = own
    if not own:
        raise UserError(
            f"base.name_or_path: the tokenizer of {source} has no chat template; set prompt.template to one "
            f"of {', '.join(BUILTIN_TEMPLATES)} (the format the base was trained to chat in)"
        )
    return "base"


@dataclass(frozen=True)
class ChatFrame:
    """A single-turn prompt as plain strings, the stop tokens, and what the fingerprint was made of.

    `prefix + question + suffix` is the rendered prompt of a question (checked against the template when
    the frame is made). The served model renders with this alone.
    """

    prefix: str
    suffix: str
    stop_token_ids: tuple[int, ...]
    end_of_turn: str
    fingerprint: str
    material: dict[str, Any]

    def prompt(self, question: str) -> str:
        return self.prefix + question.strip() + self.suffix

    def check_tokenizer(self, token_to_id: Any, where: Path, expected: str | None = None) -> None:
        """Refuse a tokenizer that maps this format's special tokens to other ids, or (with `expected`)
        a frame that is not the one a model was registered with.

        Raises:
            UserError: one line naming both.
        """
        _check_tokenizer(self, token_to_id, where, expected)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / CHAT_FILE
        path.write_text(json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: Path) -> ChatFrame:
        """The frame saved in `directory`, its fingerprint checked against its own material.

        Raises:
            UserError: the file is missing, malformed, or its fingerprint does not match its material.
        """
        path = Path(directory) / CHAT_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            frame = cls(**{**data, "stop_token_ids": tuple(data["stop_token_ids"])})
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UserError(
                f"{path}: missing or malformed chat format ({exc}); re-run `qa-lora export`"
            ) from None
        if fingerprint_of(frame.material) != frame.fingerprint:
            raise UserError(
                f"{path}: the chat format's fingerprint does not match its content (edited by hand?)"
            )
        return frame


def _check_tokenizer(frame: ChatFrame, token_to_id: Any, where: Path, expected: str | None = None) -> None:
    """See :meth:`ChatFrame.check_tokenizer`."""
    if expected is not None and expected != frame.fingerprint:
        raise UserError(
            f"{where}: chat format {frame.fingerprint}, but the model was registered with {expected}; "
            "the export's chat_format.json was replaced"
        )
    for name, (token, token_id) in frame.material["special_tokens"].items():
        if token is not None and token_to_id(token) != token_id:
            raise UserError(
                f"{where}: the tokenizer maps {name} {token!r} to {token_to_id(token)}, but the chat format "
                f"{frame.fingerprint} was made with id {token_id}; the tokenizer does not belong to this model"
            )


def chat_format(cfg: Config, tokenizer: Any) -> ChatFormat:
    """The chat format of a tokenizer from :func:`tasks.plumbing.loading.load_tokenizer` under `cfg`."""
    source = "base" if cfg.prompt.template == "auto" else f"builtin:{cfg.prompt.template}"
    return ChatFormat(tokenizer, cfg.data.system_prompt, source)


def fingerprint_of(material: Mapping[str, Any]) -> str:
    """Short sha256 of the fingerprint material (canonical JSON)."""
    blob = json.dumps(material, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_same_format(directory: Path, expected: ChatFormat) -> None:
    """Refuse an adapter or export (`directory`, holding chat_format.json) made with another chat format
    than the base's under this config: its prompts, masks and stop tokens would not match.

    Raises:
        UserError: one line naming both fingerprints and templates.
    """
    recorded = ChatFrame.load(directory).fingerprint if (Path(directory) / CHAT_FILE).is_file() else None
    if recorded is None:
        raise UserError(
            f"{directory}: no {CHAT_FILE} (made before chat formats were recorded); re-run its stage"
        )
    if recorded != expected.fingerprint:
        raise UserError(
            f"{directory}: made with chat format {recorded}, but the base loaded here renders with "
            f"{expected.fingerprint} ({expected.source} template, end of turn {expected.end_of_turn!r}); retrain, "
            "or set base.name_or_path / prompt.template / data.system_prompt back to what it was trained with"
        )


class ChatFormat:
    """Rows rendered with a tokenizer's chat template: prompts, training sequences, stop tokens, markers.

    A row is a split row: `question`, `answer`, and optionally `system` and `history` (the turns before
    the last question, as {role, content} dicts). `system_prompt` (`data.system_prompt`) is used for rows
    without a system message of their own.
    """

    def __init__(self, tokenizer: Any, system_prompt: str | None = None, source: str = "base") -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt or None
        self.source = source
        self.template: str = tokenizer.chat_template
        self.prefix, self.suffix = self._prompt_frame()
        self.answer_prefix, self.answer_suffix, self.end_of_turn = self._answer_frame()
        self.end_of_turn_id: int = tokenizer.convert_tokens_to_ids(self.end_of_turn)
        eos = tokenizer.eos_token_id
        self.stop_token_ids = tuple(dict.fromkeys(i for i in (self.end_of_turn_id, eos) if i is not None))
        self.markers = self._markers()
        self._marker_re = re.compile(
            "|".join(re.escape(m) for m in sorted(self.markers, key=len, reverse=True))
        )
        self.material = self._material()
        self.fingerprint = fingerprint_of(self.material)

    # ---------------------------------------------------------------------------------------- rendering

    def render(self, messages: Sequence[Mapping[str, str]], *, generation: bool) -> str:
        """The template's text for `messages` (with the assistant header when `generation`).

        Raises:
            ChatError: the template refuses the conversation (roles out of order, an unknown role).
        """
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation
            )
        except (TemplateError, ValueError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ChatError(f"the chat template refuses this conversation ({first})") from None

    def conversation(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        """[system], the earlier turns, and the row's question as the last user turn."""
        system = _text(row.get("system")) or self.system_prompt
        turns = [{"role": "system", "content": system}] if system else []
        turns += [{"role": t["role"], "content": t["content"]} for t in _turns(row)]
        turns.append({"role": "user", "content": row["question"].strip()})
        return turns

    def prompt(self, row: Mapping[str, Any] | str) -> str:
        """The prompt a model answers `row` (or a plain question) from: rendered up to the assistant's turn."""
        if isinstance(row, str):
            row = {"question": row}
        if self._framed(row):
            return self.prefix + row["question"].strip() + self.suffix
        return self.render(self.conversation(row), generation=True)

    def example(self, row: Mapping[str, Any]) -> tuple[str, list[tuple[int, int]]]:
        """The training text of `row`, ending with the end-of-turn token, and the character spans of its
        assistant turns (the loss is on these; the last runs from the prompt's end to the text's end).

        Raises:
            ChatError: the template refuses the conversation, or renders an earlier turn differently
                once later ones follow (its answer could not be found for the loss).
        """
        if self._framed(row):
            prompt = self.prompt(row)
            text = prompt + self.answer_prefix + row["answer"].strip() + self.answer_suffix
            return text, [(len(prompt), len(text))]
        turns = [*self.conversation(row), {"role": "assistant", "content": row["answer"].strip()}]
        full = self.render(turns, generation=False)
        spans = []
        for k, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = self.render(turns[:k], generation=True)
            upto = self.render(turns[: k + 1], generation=False)
            end = upto.rfind(self.end_of_turn) + len(self.end_of_turn)
            if end <= len(before) or not (upto.startswith(before) and full.startswith(upto[:end])):
                later = "its answer follows" if k == len(turns) - 1 else "later turns follow"
                raise ChatError(
                    f"the chat template renders the prompt of message {k + 1} differently once {later}, so "
                    "the answer cannot be told apart for the loss (a template that moves the system message?)"
                )
            spans.append((len(before), end))
        return full[: spans[-1][1]], spans

    def _framed(self, row: Mapping[str, Any]) -> bool:
        """Whether the single-turn frame renders `row` (no earlier turns, no system message of its own)."""
        system = _text(row.get("system"))
        return self._frame_ok and not _turns(row) and (not system or system == self.system_prompt)

    # --------------------------------------------------------------------------------------- tokenizing

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], list[int]]]:
        """(input_ids, completion_mask) per row: the training sequence, 1 on assistant tokens.

        The rendered example is tokenized whole, no special tokens added (BOS comes from the template's
        text). For a single exchange the answer starts where the tokens of the prompt alone and of the
        whole example diverge (as TRL's SFTTrainer masks prompt/completion data); in a conversation a
        token is trained when it starts inside an assistant span (an answer and its end-of-turn token).
        The template's own text, the system message and every user turn are masked.

        Raises:
            ChatError: a row the template cannot render as an example (see :meth:`example`).
        """
        examples = [self.example(row) for row in rows]
        full = self.token_ids([text for text, _ in examples])
        single = [i for i, (_, spans) in enumerate(examples) if len(spans) == 1]
        heads = self.token_ids([examples[i][0][: examples[i][1][0][0]] for i in single])
        masks: dict[int, list[int]] = {}
        for i, head in zip(single, heads, strict=True):
            k = _common_prefix(head, full[i])
            masks[i] = [0] * k + [1] * (len(full[i]) - k)
        turns = [i for i in range(len(examples)) if i not in masks]
        if turns:
            enc = self.tokenizer(
                [examples[i][0] for i in turns], add_special_tokens=False, return_offsets_mapping=True
            )
            for i, offsets in zip(turns, enc["offset_mapping"], strict=True):
                spans = examples[i][1]
                masks[i] = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in offsets]
        return [(full[i], masks[i]) for i in range(len(examples))]

    def token_ids(self, texts: Sequence[str], batch: int = 2000) -> list[list[int]]:
        """Token ids of rendered texts, no special tokens added: on the Rust tokenizer in batches (no
        character offsets, no per-token Python objects; a 50,000-text batch through transformers' call
        held ~1.5 GB of encodings at once)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer
            return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # tokenizers >= 0.21
        out: list[list[int]] = []
        for i in range(0, len(texts), batch):
            out += [e.ids for e in encode(list(texts[i : i + batch]), add_special_tokens=False)]
        return out

    def prompt_ids(self, rows: Sequence[Mapping[str, Any] | str]) -> list[list[int]]:
        """The token ids of each row's prompt, as generation starts from them (no special tokens added)."""
        return self.tokenizer([self.prompt(r) for r in rows], add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------------------------ forged turns

    def find_markers(self, text: str) -> list[str]:
        """The control sequences (special/added tokens, the template's markers) found in user text."""
        return sorted({m.group(0) for m in self._marker_re.finditer(text)}) if self.markers else []

    def _markers(self) -> tuple[str, ...]:
        tok = self.tokenizer
        found = (
            set(tok.all_special_tokens) | set(tok.get_added_vocab()) | set(_MARKER_RE.findall(self.template))
        )
        return tuple(sorted(m for m in found if m.strip()))

    # ------------------------------------------------------------------------------------------ frames

    def _prompt_frame(self) -> tuple[str, str]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        try:
            rendered = self.render([*system, {"role": "user", "content": _Q}], generation=True)
        except ChatError as exc:
            raise UserError(
                f"chat template ({self.source}): cannot render a one-question chat: {exc}"
            ) from None
        if rendered.count(_Q) != 1:
            raise UserError(
                f"chat template ({self.source}): a user message does not appear once, verbatim, in its "
                "rendering; choose another template (prompt.template)"
            )
        prefix, suffix = rendered.split(_Q)
        return prefix, suffix

    def _answer_frame(self) -> tuple[str, str, str]:
        """(text between the prompt and the answer, the text after the answer up to and including the
        end-of-turn token, that token): the first special token the template writes after an answer."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        turns = [*system, {"role": "user", "content": _Q}, {"role": "assistant", "content": _A}]
        prompt = self.prefix + _Q + self.suffix
        full = self.render(turns, generation=False)
        if not full.startswith(prompt) or full.count(_A) != 1:
            raise UserError(
                f"chat template ({self.source}): the prompt is rendered differently once the answer "
                "follows, so training and generation would not see the same text; choose another template"
            )
        answer_prefix, after = full[len(prompt) :].split(_A)
        specials = set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab())
        hits = [(after.find(s), -len(s), s) for s in specials if s and s in after]
        if not hits:
            raise UserError(
                f"chat template ({self.source}): an answer is followed by {after!r}, which holds no special "
                "token, so generation could not stop at the end of a turn; choose another template"
            )
        self._frame_ok = self._frame_holds(system)
        at, _, end_of_turn = min(hits)
        return answer_prefix, after[: at + len(end_of_turn)], end_of_turn

    def _frame_holds(self, system: list[dict[str, str]]) -> bool:
        """Whether the frame renders like the template on two unlike questions (no branching on content)."""
        for question in ("What is x?", "Line one\n\tline two: {a} [b] 'c' \"d\" é"):
            rendered = self.render([*system, {"role": "user", "content": question}], generation=True)
            if rendered != self.prefix + question + self.suffix:
                return False
        return True

    def _material(self) -> dict[str, Any]:
        tok = self.tokenizer
        specials = {
            name: [getattr(tok, name), getattr(tok, f"{name}_id")]
            for name in ("bos_token", "eos_token", "unk_token")
        }
        added = json.dumps(sorted(tok.get_added_vocab().items())).encode()
        return {
            "template": self.template,
            "system_prompt": self.system_prompt,
            "special_tokens": {**specials, "end_of_turn": [self.end_of_turn, self.end_of_turn_id]},
            "added_tokens_sha256": hashlib.sha256(added).hexdigest()[:16],
            "frame": [self.prefix, self.suffix, self.answer_prefix, self.answer_suffix],
        }

    def frame(self) -> ChatFrame:
        """What the served model needs: the prompt frame, the stop tokens, the fingerprint."""
        return ChatFrame(
            self.prefix, self.suffix, self.stop_token_ids, self.end_of_turn, self.fingerprint, self.material
        )

    def describe(self) -> dict[str, Any]:
        """For summaries, reports and tags: where the template came from and what it decided."""
        return {
            "fingerprint": self.fingerprint,
            "template": self.source,
            "end_of_turn": self.end_of_turn,
            "stop_token_ids": list(self.stop_token_ids),
            "system_prompt": self.system_prompt,
            "example": self.prompt("{question}") + self.answer_prefix + "{answer}" + self.answer_suffix,
        }


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    k = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        k += 1
    return k


def _text(value: Any) -> str | None:
    """A row's optional text field (None, or NaN from a dataframe, is no text)."""
    return value if isinstance(value, str) and value else None


def _turns(row: Mapping[str, Any]) -> list[Mapping[str, str]]:
    """A row's earlier turns (absent, None or NaN from a dataframe: none)."""
    history = row.get("history")
    return list(history) if isinstance(history, list | tuple) else []
