"""Merge: the fp32 base + the adapter -> one plain model, with adapter-on-base vs merged parity.

Also the PyTorch side of every parity check: :func:`torch_greedy` (prompt logits, per-step logits and
greedy tokens from `generate()`, as users call it) and :func:`compare_outputs` / :func:`raise_if_failed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.core.errors import UserError
from tasks.plumbing.loading import hub_kwargs


class ExportParityError(UserError):
    """The exported model does not reproduce the PyTorch model within tolerance; nothing was exported."""


def generation_config(cfg: Config, tokenizer: Any, stops: tuple[int, ...]) -> Any:
    """The greedy `GenerationConfig` saved with the export: it stops at the chat format's stop tokens (the
    template's end-of-turn token and EOS), as hub chat models list theirs."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops[0] if len(stops) == 1 else list(stops),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=cfg.eval.max_new_tokens,
    )


def merge_adapter(
    cfg: Config, base_src: str, adapter_dir: Path, device: str, ids: Any, mask: Any, gen_config: Any
) -> tuple[Any, dict[str, Any]]:
    """fp32 base + adapter -> merged model on CPU, with adapter-on-base vs merged parity.

    Args:
        cfg: reads `base` (loading policy) and `export.parity_new_tokens`.
        base_src: the resolved base (`resolve_base(cfg).ref`).
        adapter_dir: the trained adapter.
        device: where to merge ("cpu" or "cuda", from the memory plan).
        ids, mask: a left-padded batch of parity prompts (torch tensors).
        gen_config: from :func:`generation_config`.

    Returns:
        The merged model (on CPU, eval mode) and the parity numbers of :func:`compare_outputs`.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # Never a quantized base: merging into rounded weights degrades quality (load_base_config refuses).
    base = AutoModelForCausalLM.from_pretrained(
        base_src,
        dtype=torch.float32,
        use_safetensors=None if cfg.base.allow_pickle_weights else True,
        **hub_kwargs(cfg),
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir)).to(device).eval()
    d_ids, d_mask = ids.to(device), mask.to(device)
    before = torch_greedy(model, d_ids, d_mask, gen_config, cfg.export.parity_new_tokens)
    merged = model.merge_and_unload().eval()
    after = torch_greedy(merged, d_ids, d_mask, gen_config, cfg.export.parity_new_tokens)
    parity = compare_outputs(before, after, mask.numpy())
    merged = merged.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()
    return merged, parity


def torch_greedy(model: Any, ids: Any, mask: Any, gen_config: Any, max_new_tokens: int) -> dict[str, Any]:
    """Prompt logits, per-step logits and greedy tokens of a PyTorch model (generate(), as users call it)."""
    import copy

    import numpy as np
    import torch

    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    config = copy.deepcopy(gen_config)
    config.max_new_tokens = max_new_tokens
    with torch.inference_mode():
        prefill = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[:, ids.shape[1] :].cpu().numpy()
    stops = gen_config.eos_token_id
    stops = set(stops) if isinstance(stops, list) else {stops}
    return {
        "prefill_logits": prefill.float().cpu().numpy(),
        "step_logits": np.stack([s.float().cpu().numpy() for s in out.logits]),
        "token_ids": [_upto_stop(row, stops) for row in new.tolist()],
    }


def _upto_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """The tokens up to and including the first stop token."""
    at = next((k for k, t in enumerate(tokens) if t in stops), None)
    return tokens if at is None else tokens[: at + 1]


def compare_outputs(ref: Mapping[str, Any], got: Mapping[str, Any], mask: Any) -> dict[str, Any]:
    """Max |logit difference| over real (unpadded) prompt positions and over steps while a row is
    still generating in the reference; greedy tokens compared per prompt."""
    import numpy as np

    real = np.asarray(mask) == 1
    prefill = float(np.abs(ref["prefill_logits"] - got["prefill_logits"])[real].max())
    step = 0.0
    n_steps = min(len(ref["step_logits"]), len(got["step_logits"]))
    for s in range(n_steps):
        active = [i for i, toks in enumerate(ref["token_ids"]) if len(toks) > s]
        if active:
            step = max(
                step, float(np.abs(ref["step_logits"][s][active] - got["step_logits"][s][active]).max())
            )
    mismatched = [
        i for i, (a, b) in enumerate(zip(ref["token_ids"], got["token_ids"], strict=True)) if a != b
    ]
    return {
        "max_abs_diff": max(prefill, step),
        "prefill_max_abs_diff": prefill,
        "step_max_abs_diff": step,
        "tokens_identical": not mismatched,
        "mismatched_prompts": mismatched,
        "generated_tokens": int(sum(len(t) for t in ref["token_ids"])),
    }


def raise_if_failed(what: str, parity: Mapping[str, Any], atol: float) -> None:
    """Raise :class:`ExportParityError` when the logits differ by more than `atol` or the tokens differ."""
    problems = []
    if not parity["max_abs_diff"] <= atol:  # `not <=` so that NaN fails too
        problems.append(f"max |logit diff| {parity['max_abs_diff']:.3g} > atol {atol:g}")
    if not parity["tokens_identical"]:
        problems.append(f"greedy tokens differ on prompts {parity['mismatched_prompts']}")
    if problems:
        raise ExportParityError(f"{what} parity failed: {'; '.join(problems)}; nothing was exported")
