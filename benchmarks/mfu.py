"""Figure 2's parts: useful FLOPs per token (the MFU numerator), the GEMM yardstick, and the bare loop
over the stage's sequences re-batched (what bucketing and batch size do to tokens/s). The formula is
in benchmarks/training.py's docstring."""

from __future__ import annotations

from typing import Any

from benchmarks.common import gemm_flops, ratio
from benchmarks.training import Bare, block_rates


def figure2(cfg: Any, stage: dict[str, Any], batches: list[dict[str, Any]], quick: bool) -> dict[str, Any]:
    """MFU of the stage and the bare loop, against fp32 GEMMs measured in the same run."""
    import torch

    s_rate, s_probe = stage["trainer"]["tokens_per_s"], stage["paired_bare"]["tokens_per_s"]
    flops = flops_per_token(cfg, stage["trainer"]["mean_seq_len"])
    sizes = [256, 2048] if not quick else [256, 1024]
    gemm = gemm_flops("cpu", "float32", sizes, seconds=1.0 if not quick else 0.5)
    variants = batch_variants(cfg, batches, stage["attn_implementation"], quick)
    out = {
        "flops_per_token": flops,
        "gemm_fp32": gemm,
        "torch_threads": torch.get_num_threads(),
        "stage_achieved_flops": s_rate * flops["lora"],
        "stage_achieved_flops_6n": s_rate * flops["six_n"],
        "stage_padded_flops": stage["trainer"]["padded_tokens_per_s"] * flops["lora"],
        "bare_achieved_flops": s_probe * flops["lora"],
        "variants": variants,
    }
    for n, g in gemm.items():
        out[f"mfu_vs_gemm{n}"] = ratio(out["stage_achieved_flops"], g["flops"])
        out[f"mfu_6n_vs_gemm{n}"] = ratio(out["stage_achieved_flops_6n"], g["flops"])
        out[f"hfu_padded_vs_gemm{n}"] = ratio(out["stage_padded_flops"], g["flops"])
        out[f"bare_mfu_vs_gemm{n}"] = ratio(out["bare_achieved_flops"], g["flops"])
        for v in variants:
            v[f"mfu_vs_gemm{n}"] = ratio(v["tokens_per_s"] * flops["lora"], g["flops"])
    return out


CPU_VARIANTS = (
    ("random order, batch 16", 16, False),
    ("length-grouped, batch 16", 16, True),
    ("length-grouped, batch 32", 32, True),
    ("length-grouped, batch 64", 64, True),
)


def batch_variants(
    cfg: Any,
    batches: list[dict[str, Any]],
    attn: str,
    quick: bool,
    variants: tuple[tuple[str, int, bool], ...] = CPU_VARIANTS,
    warm_all: bool = False,
) -> list[dict[str, Any]]:
    """The bare loop over the stage's sequences re-batched: (name, batch size, length-grouped) each.

    Shows what bucketing and larger batches do to tokens/s (and so to MFU) on this machine.
    `warm_all`: one untimed pass over every batch first (a GPU pays once per new shape).
    """
    import torch

    seqs = []
    for b in batches:
        for row in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][row].sum())
            seqs.append((b["input_ids"][row, :n], b["labels"][row, :n]))
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(seqs), generator=g).tolist()
    pool = [seqs[i] for i in order][: 128 if quick else 192]
    bare = Bare(cfg, attn)
    out = []
    for name, size, grouped in variants:
        items = sorted(pool, key=lambda s: -len(s[0])) if grouped else pool
        made = [_pad(items[i : i + size]) for i in range(0, len(items) - size + 1, size)]
        if grouped:  # shuffle the batches, not the rows inside them (the stage's sampler does so too)
            made = [made[i] for i in torch.randperm(len(made), generator=g).tolist()]
        if warm_all:
            for b in made:
                bare.step(b)
        made = [made[0], *made]  # first step is warm-up
        times = [bare.step(b) for b in made]
        rates = block_rates(made, times, warmup=1, blocks=1)
        out.append({"variant": name, "batch": size, **rates})
    return out


def _pad(rows: list[tuple[Any, Any]]) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), 0, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def flops_per_token(cfg: Any, mean_seq_len: float) -> dict[str, Any]:
    """Counts of the base model (from its config, on the meta device) and the LoRA adapter."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    mconf = AutoConfig.from_pretrained(str(cfg.resolve(cfg.base.name_or_path)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mconf)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings()
    head_tied = head is not None and head.weight is model.get_input_embeddings().weight
    n_lora = 0
    targets = set(cfg.lora.target_modules)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            n_lora += cfg.lora.r * (m.in_features + m.out_features)
    # lora.modules_to_save trains weights in full: a matmul among them (the tied LM head when the
    # embeddings are saved) also needs its weight gradient, 2N more per token.
    wanted = set(cfg.lora.modules_to_save)
    saved = {
        id(p)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in wanted
        for p in m.parameters()
    }
    n_full = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m.weight) in saved
    )
    layers, d = mconf.num_hidden_layers, mconf.hidden_size
    attn = 12 * layers * d * mean_seq_len
    lora_flops = 4 * linear + 2 * n_full + 6 * n_lora + attn
    return {
        "formula": "4*N_matmul + 2*N_full_matmul + 6*N_lora + 12*L*d*T",
        "N_params": total,
        "N_frozen_matmul": linear,
        "N_full_matmul": n_full,
        "lm_head_tied": head_tied,
        "N_lora": n_lora,
        "L": layers,
        "d": d,
        "T_mean": round(mean_seq_len, 1),
        "lora": lora_flops,
        "six_n": 6 * total,
    }
