"""ONNX: one decoder graph with a past/present KV cache, its layout file, and its parity with PyTorch.

The graph (`onnx/model.onnx` + `.data`) runs the prompt on an empty cache (prefill), then one token per
step; `onnx_layout.json` names its inputs, outputs and cache tensors for tasks.plumbing.onnx_generate.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.plumbing.chat import ChatFormat
from tasks.plumbing.onnx_generate import LAYOUT_FILE, LAYOUT_FORMAT, OnnxGenerator
from tasks.plumbing.ort_runtime import ProviderChoice, cpu_choice, create_session
from tasks.stages.export.merge import ExportParityError, compare_outputs

ONNX_GRAPH = "model.onnx"
_SAMPLE_QUESTIONS = ("What is ONNX?", "Why does a decoder keep a cache of keys and values between steps?")
_STANDARD_INPUTS = ("input_ids", "attention_mask", "position_ids")
_CACHE_NAME = re.compile(r"layers\.(\d+)\.(keys|values)$")


def export_onnx(model: Any, chat: ChatFormat, gen_config: Any, out_dir: Path, opset: int) -> dict[str, Any]:
    """One decoder graph with past/present KV cache, dynamic batch and sequence, + tokenizer, chat format
    (chat_format.json: the prompt frame and stop tokens a server renders with) + layout.

    `transformers.exporters` captures the forward calls of a real `generate()`; with
    `multi_token_decode` its decode component keeps the query axis symbolic, so the same graph runs the
    prompt on an empty cache and then one token per step (no duplicate prefill graph and weights).
    The sample is a batch of 2 prompts of different lengths: a batch of 1 would fix the batch axis.

    Args:
        model: the merged fp32 model (on CPU).
        chat: the chat format of its tokenizer (left padding); both saved beside the graph.
        gen_config: the greedy generation config, saved beside the graph.
        out_dir: the export's onnx/ directory (created).
        opset: `export.opset`.

    Returns:
        The layout written to `onnx_layout.json` (read back from the saved graph, not assumed).
    """
    from transformers.exporters import OnnxConfig, OnnxExporter
    from transformers.exporters.utils import decompose_prefill_decode

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = chat.tokenizer
    prompts = [chat.prompt(q) for q in _SAMPLE_QUESTIONS]
    sample = dict(tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False))
    stages = decompose_prefill_decode(model, sample, generation_config=gen_config, multi_token_decode=True)
    decode_model, decode_inputs = stages["decode"]
    with quiet():
        exported = OnnxExporter().export(
            decode_model, decode_inputs, OnnxConfig(dynamic=True, opset_version=opset)
        )
    OnnxExporter.save_program(exported.program, out_dir / ONNX_GRAPH)
    del exported, stages
    gc.collect()
    model.config.save_pretrained(str(out_dir))
    gen_config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    chat.frame().save(out_dir)

    # The layout is read back from the saved graph (on the CPU provider: it only lists names).
    session, _ = create_session(out_dir / ONNX_GRAPH, cpu_choice(["CPUExecutionProvider"], "layout"))
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    del session
    layout = graph_layout(*names, model.config, chat, opset)
    (out_dir / LAYOUT_FILE).write_text(json.dumps(layout, indent=2) + "\n", encoding="utf-8")
    return layout


def graph_layout(
    inputs: Sequence[str], outputs: Sequence[str], config: Any, chat: ChatFormat, opset: int
) -> dict[str, Any]:
    """The `onnx_layout.json` content from the graph's input and output names and the model config.

    Raises:
        RuntimeError: the graph lacks a standard input or logits, or its cache tensors do not pair up.
    """
    tokenizer = chat.tokenizer
    cache = _cache_pairs(inputs, outputs, int(config.num_hidden_layers))
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return {
        "format": LAYOUT_FORMAT,
        "graph": ONNX_GRAPH,
        "opset": opset,
        "dtype": "float32",
        "inputs": {n: n for n in _STANDARD_INPUTS},
        "logits": "logits",
        "cache": cache,
        "cache_shape": ["batch", heads, "past_sequence", head_dim],
        "num_layers": int(config.num_hidden_layers),
        "num_key_value_heads": heads,
        "head_dim": head_dim,
        "vocab_size": int(config.vocab_size),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "stop_token_ids": list(chat.stop_token_ids),  # the template's end-of-turn token, EOS
        "pad_token_id": tokenizer.pad_token_id,
        "padding_side": "left",
        "usage": (
            "prefill: run the graph on the left-padded prompt with every cache input of shape "
            "(batch, heads, 0, head_dim); decode: feed one token, the cache outputs of the previous call, "
            "the attention mask grown by one column of ones; position_ids = cumsum(attention_mask) - 1, "
            "0 at padding (see tasks/plumbing/onnx_generate.py)"
        ),
    }


def _cache_pairs(inputs: Sequence[str], outputs: Sequence[str], n_layers: int) -> list[dict[str, Any]]:
    """Per layer and kind (keys, values): the cache input and the output that feeds it next step."""
    missing = [n for n in _STANDARD_INPUTS if n not in inputs] + ([] if "logits" in outputs else ["logits"])
    if missing:
        raise RuntimeError(f"exported graph lacks {missing}; inputs {inputs}, outputs {outputs}")
    cache_in = _keyed([n for n in inputs if n not in _STANDARD_INPUTS])
    cache_out = _keyed([n for n in outputs if n != "logits"])
    expected = {(layer, kind) for layer in range(n_layers) for kind in ("keys", "values")}
    if set(cache_in) != expected or set(cache_out) != expected:
        raise RuntimeError(
            f"exported graph's cache tensors do not pair up per layer: inputs {inputs}, outputs {outputs}"
        )
    return [
        {"layer": layer, "kind": kind, "input": cache_in[(layer, kind)], "output": cache_out[(layer, kind)]}
        for layer in range(n_layers)
        for kind in ("keys", "values")
    ]


def _keyed(names: Sequence[str]) -> dict[tuple[int, str], str]:
    found = {}
    for name in names:
        m = _CACHE_NAME.search(name)
        if m:
            found[(int(m.group(1)), m.group(2))] = name
    return found


def check_onnx_parity(
    onnx_dir: Path,
    choice: ProviderChoice,
    prompts: Sequence[str],
    ids: Any,
    mask: Any,
    reference: Mapping[str, Any],
    max_new_tokens: int,
) -> dict[str, Any]:
    """The exported graph, as a consumer loads it (tokenizer from onnx/), vs the PyTorch reference.

    Raises:
        ExportParityError: the saved tokenizer encodes the prompts differently from the one used here.
        ProviderUnavailable: the provider did not load (a fallback, when allowed, was decided earlier
            and `choice` is then the CPU).
    """
    import numpy as np

    gen = OnnxGenerator(onnx_dir, provider=choice.name)
    check_ids, check_mask = gen.encode(prompts)
    if not (np.array_equal(check_ids, ids) and np.array_equal(check_mask, mask)):
        raise ExportParityError(
            f"{onnx_dir}: the saved tokenizer encodes the parity prompts differently; nothing was exported"
        )
    result = gen.generate_ids(ids, mask, max_new_tokens, return_logits=True)
    got = {
        "prefill_logits": result.prefill_logits,
        "step_logits": result.step_logits,
        "token_ids": result.token_ids,
    }
    return {**compare_outputs(reference, got, mask), "provider": gen.provider}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence INFO lines of the ONNX tool chain (one per deduplicated initializer or quantized tensor,
    thousands for a 7B model; the quantizer logs on the root logger) while keeping warnings."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


def graph_size(graph: Path) -> int:
    """Bytes of a graph file and its external-data file."""
    data = graph.with_name(graph.name + ".data")
    return graph.stat().st_size + (data.stat().st_size if data.is_file() else 0)
