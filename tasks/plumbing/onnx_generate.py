"""Greedy generation on ONNX Runtime over the exported decoder (one graph with a KV cache).

The export stage (tasks/stages/export) writes `model.onnx` (+ `model.onnx.data`), the tokenizer,
`chat_format.json` (the base's chat template as a prompt frame, its stop tokens; tasks/plumbing/chat.py)
and `onnx_layout.json`, which names the graph's inputs, outputs and cache tensors. One graph serves both
phases: the prompt runs with an empty (length-0) cache (prefill), then one token per step runs with the
cache the previous step returned (decode). Prompts are left-padded; position ids are
`cumsum(attention_mask) - 1` (0 at padding), exactly as `transformers` `generate()` computes them, so
greedy tokens match PyTorch's.

Needs only numpy, onnxruntime and a tokenizer (no torch), so a registry consumer can run it:

    from tasks.plumbing.onnx_generate import load_onnx_generator

    gen = load_onnx_generator("runs/local/export/onnx")
    out = gen.generate([gen.chat.prompt("What does zip() return?")], max_new_tokens=64)
    print(out.texts[0], gen.provider)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.errors import UserError
from tasks.plumbing.chat import ChatFrame
from tasks.plumbing.ort_runtime import (
    PROVIDER_NAMES,
    PROVIDER_PRIORITY,
    ProviderChoice,
    choose_provider,
    create_session,
    import_onnxruntime,
)

log = logging.getLogger("qa_lora.onnx_generate")

# Provider choice lives in tasks.plumbing.ort_runtime; re-exported here for consumers of this module.
__all__ = [
    "LAYOUT_FILE",
    "LAYOUT_FORMAT",
    "PROVIDER_NAMES",
    "PROVIDER_PRIORITY",
    "GenerationResult",
    "OnnxGenerator",
    "ProviderChoice",
    "choose_provider",
    "default_session_options",
    "load_onnx_generator",
]

LAYOUT_FILE = "onnx_layout.json"
LAYOUT_FORMAT = "qa-lora-onnx-kv/1"

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class GenerationResult:
    """Greedy generation output. `token_ids` are the new tokens per prompt, up to and including the stop
    token (the chat template's end-of-turn token, or EOS)."""

    texts: list[str]
    token_ids: list[list[int]]
    finished: list[bool]
    # (batch, prompt_len, vocab) logits of the prompt, and per step (steps, batch, vocab), when asked.
    prefill_logits: np.ndarray | None = None
    step_logits: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class OnnxGenerator:
    """A tokenizer and one ONNX Runtime session over the exported decoder, with a greedy loop."""

    def __init__(
        self,
        onnx_dir: str | Path,
        provider: str = "auto",
        graph: str | None = None,
        session_options: Any = None,
        tokenizer: Any = None,
        allow_cpu_fallback: bool = False,
    ) -> None:
        ort = import_onnxruntime()
        self.onnx_dir = Path(onnx_dir)
        self.layout: dict[str, Any] = _read_layout(self.onnx_dir)
        graph_path = self.onnx_dir / (graph or self.layout["graph"])
        if not graph_path.is_file():
            raise UserError(f"{graph_path}: ONNX graph not found")
        self.choice = choose_provider(ort.get_available_providers(), provider)
        if session_options is None:
            session_options = default_session_options(ort)
        # `fallback` is None, or why the chosen GPU provider did not load (only when that is allowed).
        self.session, self.fallback = create_session(
            graph_path, self.choice, session_options, allow_cpu_fallback=allow_cpu_fallback
        )
        self.provider = self.session.get_providers()[0]
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(self.onnx_dir)
        self.chat = ChatFrame.load(self.onnx_dir)  # the prompt frame of the base's chat template
        self.eos_token_id: int = int(self.layout["eos_token_id"])
        self.stop_token_ids = np.array(
            self.layout.get("stop_token_ids") or [self.eos_token_id], dtype=np.int64
        )
        self.pad_token_id: int = int(self.layout["pad_token_id"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._cache = self.layout["cache"]
        self._cache_dtype = _ORT_TO_NUMPY.get(inputs[self._cache[0]["input"]].type, np.float32)
        missing = [n for n in self._input_names() if n not in inputs]
        if missing:
            raise UserError(f"{graph_path}: graph lacks inputs {missing} named in {LAYOUT_FILE}")

    def _input_names(self) -> list[str]:
        names = list(self.layout["inputs"].values())
        return names + [c["input"] for c in self._cache]

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize rendered prompts (their special tokens are in the text: none added) and left-pad them:
        (input_ids, attention_mask), int64, shape (batch, length)."""
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(list(prompts), padding=True, return_tensors="np", add_special_tokens=False)
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """Length-0 cache tensors: what the first (prefill) call takes."""
        shape = (batch, int(self.layout["num_key_value_heads"]), 0, int(self.layout["head_dim"]))
        return [np.zeros(shape, dtype=self._cache_dtype) for _ in self._cache]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: list[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the graph: logits (batch, new_len, vocab) and the grown cache.

        `attention_mask` covers the cache plus the new tokens (batch, past_len + new_len).
        """
        names = self.layout["inputs"]
        feed = {
            names["input_ids"]: input_ids,
            names["attention_mask"]: attention_mask,
            names["position_ids"]: position_ids,
        }
        feed.update({c["input"]: t for c, t in zip(self._cache, cache, strict=True)})
        outputs = [self.layout["logits"]] + [c["output"] for c in self._cache]
        result = self.session.run(outputs, feed)
        return result[0], list(result[1:])

    def generate_ids(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        max_new_tokens: int,
        return_logits: bool = False,
    ) -> GenerationResult:
        """Greedy decoding from left-padded token ids (no text decoding).

        Rows that emitted a stop token are fed the pad token (attention 1) until every row is done, the
        way `transformers` `generate()` does, so step logits stay comparable with PyTorch's.
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        batch = input_ids.shape[0]
        position_ids = np.cumsum(mask, axis=-1) - 1
        position_ids[mask == 0] = 0
        logits, cache = self.forward(input_ids, mask, position_ids, self.empty_cache(batch))
        prefill = logits if return_logits else None
        last = logits[:, -1, :]
        next_pos = position_ids[:, -1:] + 1
        done = np.zeros(batch, dtype=bool)
        new_tokens: list[np.ndarray] = []
        steps: list[np.ndarray] = []
        for step in range(max_new_tokens):
            if return_logits:
                steps.append(last.astype(np.float32))
            token = last.argmax(axis=-1).astype(np.int64)
            token = np.where(done, self.pad_token_id, token)
            new_tokens.append(token)
            done |= np.isin(token, self.stop_token_ids)
            if done.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            logits, cache = self.forward(token[:, None], mask, next_pos, cache)
            last = logits[:, -1, :]
            next_pos = next_pos + 1
        token_ids = _trim(
            np.stack(new_tokens, axis=1) if new_tokens else np.zeros((batch, 0), np.int64),
            set(self.stop_token_ids.tolist()),
        )
        return GenerationResult(
            texts=[],
            token_ids=token_ids,
            finished=[bool(d) for d in done],
            prefill_logits=prefill,
            step_logits=np.stack(steps) if steps else None,
            meta={"provider": self.provider, "cpu_fallback": self.fallback},
        )

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int = 64, return_logits: bool = False
    ) -> GenerationResult:
        """Greedy-generate answers for rendered prompts (`self.chat.prompt(question)`).

        Args:
            prompts: rendered prompt strings (BOS, where the template writes one, is in the text).
            max_new_tokens: upper bound on generated tokens per prompt (a stop token ends one earlier).
            return_logits: also return prompt and per-step logits (parity checks).

        Returns:
            Texts (special tokens removed), new token ids (up to and including the stop token), finished
            flags.
        """
        if not prompts:
            return GenerationResult(texts=[], token_ids=[], finished=[])
        input_ids, mask = self.encode(prompts)
        result = self.generate_ids(input_ids, mask, max_new_tokens, return_logits=return_logits)
        result.texts = [
            self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in result.token_ids
        ]
        return result


def default_session_options(ort: Any) -> Any:
    """Session options chosen by measurement (benchmarks/RESULTS.md, figure 3) for the greedy loop.

    * intra-op threads = the CPUs this process may use. Against ORT's own default (0, it sizes the pool
      itself), the explicit count made generation 17% faster at batch 1 and 8% at batch 8 on a 2-core
      VM (median of 25 interleaved repeats; identical tokens). IOBinding of the cache (kept as OrtValues
      between steps) was measured too: no gain on the CPU, where `run` already wraps numpy without a copy.
    * No memory pattern: the cache grows by one every step, so shapes change each call and a planned
      arena would be wasted memory.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    options.enable_mem_pattern = False
    return options


def _trim(tokens: np.ndarray, stops: set[int]) -> list[list[int]]:
    """Per row: the tokens up to and including the first stop token."""
    out: list[list[int]] = []
    for row in tokens.tolist():
        at = next((k for k, t in enumerate(row) if t in stops), None)
        out.append(row if at is None else row[: at + 1])
    return out


def _read_layout(onnx_dir: Path) -> dict[str, Any]:
    layout_path = onnx_dir / LAYOUT_FILE
    if not layout_path.is_file():
        raise UserError(f"{layout_path}: missing; expected an ONNX export written by `qa-lora export`")
    layout = json.loads(layout_path.read_text(encoding="utf-8"))
    if layout.get("format") != LAYOUT_FORMAT:
        raise UserError(f"{layout_path}: format {layout.get('format')!r}, expected {LAYOUT_FORMAT!r}")
    return layout


def _load_tokenizer(directory: Path) -> Any:
    """The tokenizer saved beside the graph (no config here: a registry consumer has only the files),
    with the project's one pad rule (tasks.plumbing.loading)."""
    from transformers import AutoTokenizer

    from tasks.plumbing.loading import apply_pad_rule

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    apply_pad_rule(tokenizer, str(directory))
    tokenizer.padding_side = "left"
    return tokenizer


def load_onnx_generator(
    onnx_dir: str | Path, provider: str = "auto", graph: str | None = None, allow_cpu_fallback: bool = False
) -> OnnxGenerator:
    """Load an ONNX export (written by `qa-lora export`) for greedy generation.

    Args:
        onnx_dir: the export's `onnx/` directory (graph, tokenizer, `onnx_layout.json`).
        provider: "auto" (MIGraphX, ROCM, CUDA, CPU: the first installed) or one of those names.
        graph: another graph file in the same layout (e.g. "fp16/model.onnx"); default the fp32 one.
        allow_cpu_fallback: run on the CPU (with a warning; see `.fallback`) when the chosen GPU provider
            does not load, instead of failing.

    Returns:
        The generator; `.generate(prompts, max_new_tokens)` returns texts and token ids.

    Raises:
        UserError: no (or more than one) ONNX Runtime installed, or a malformed export.
        ProviderUnavailable: the chosen GPU provider did not load and no fallback is allowed.
    """
    return OnnxGenerator(onnx_dir, provider=provider, graph=graph, allow_cpu_fallback=allow_cpu_fallback)
