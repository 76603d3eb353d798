"""Figure 6: peak memory of train and merge vs the model's bytes.

Each measurement runs in a fresh interpreter: import the libraries the step needs, read the resident
set (the baseline), run the step, read the peak (VmHWM, reset after the imports). Reported: (peak - baseline) / model bytes.

* train: `tasks.stages.train.train_adapter` on the tiny base (a few steps). The tiny model is 10 MB, so this
  ratio is dominated by fixed costs (tokenized datasets, optimizer, MLflow, allocator) and says little
  about copies of the weights.
* merge: the export stage's own merge (`tasks.stages.export.merge_adapter`: fp32 base + adapter ->
  merge_and_unload, with its parity generation) on the tiny base and on a larger random-weight Llama
  (~90M parameters, ~350 MB in fp32) with a random non-zero adapter, where the ratio shows how many
  copies of the weights the merge holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import bench_config, loadavg, run_python, write_split

_PRELUDE = r"""
import json, os, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
def peak():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a big process
    # would report its parent's peak
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass
"""

_TRAIN = (
    _PRELUDE
    + r"""
import torch, transformers, peft, trl, datasets, mlflow, accelerate
from tasks.core.config import load_config
import tasks.stages.train, tasks.plumbing.device, tasks.plumbing.tracking
args = json.loads(os.environ["BENCH_ARGS"])
cfg = load_config(None, [tuple(o) for o in args["overrides"]])
base_rss = rss()
reset_peak()
from pathlib import Path
tasks.stages.train.train_adapter(cfg, Path(args["run_dir"]))
print(json.dumps({"baseline_rss": base_rss, "peak_rss": peak()}))
"""
)

_MERGE = (
    _PRELUDE
    + r"""
import torch, transformers, peft
from pathlib import Path
from tasks.core.config import load_config
from tasks.stages.export import generation_config, merge_adapter
from tasks.plumbing.chat import chat_format
from tasks.plumbing.loading import load_tokenizer, resolve_base
args = json.loads(os.environ["BENCH_ARGS"])
cfg = load_config(None, [tuple(o) for o in args["overrides"]])
adapter = Path(args["adapter"])
base_src = resolve_base(cfg).ref
tok = load_tokenizer(cfg, adapter, padding_side="left")
chat = chat_format(cfg, tok)
prompts = [chat.prompt("What is a list?"), chat.prompt("Why?")]
enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
gen = generation_config(cfg, tok, chat.stop_token_ids)
base_rss = rss()
reset_peak()
merged, parity = merge_adapter(cfg, base_src, adapter, "cpu", enc["input_ids"], enc["attention_mask"], gen)
print(json.dumps({"baseline_rss": base_rss, "peak_rss": peak(), "after_rss": rss(),
                  "max_abs_diff": parity.get("max_abs_diff")}))
"""
)


def run(tmp: Path, quick: bool) -> dict[str, Any]:
    """Train and merge peaks, each in its own interpreter."""
    load = loadavg()
    tiny_cfg = bench_config(tmp)
    tiny = tiny_cfg.resolve(tiny_cfg.base.name_or_path)
    tiny_bytes = _weights_bytes(tiny)

    run_dir = tmp / "runs" / "mem-bench"
    write_split(run_dir)
    overrides = [
        ("register.tracking_uri", f"sqlite:///{tmp}/mlflow-mem.db"),
        ("eval.cache_dir", None),
        ("train.max_steps", 4 if quick else 6),
        ("train.save_steps", 10_000),
        ("runtime.device", "cpu"),
    ]
    train = run_python(
        _TRAIN, env={"BENCH_ARGS": json.dumps({"overrides": overrides, "run_dir": str(run_dir)})}
    )
    out: dict[str, Any] = {"load": load, "train_tiny": _ratio(train, tiny_bytes, "tiny base, fp32")}

    merge_tiny = run_python(
        _MERGE,
        env={
            "BENCH_ARGS": json.dumps({"overrides": overrides, "adapter": str(run_dir / "train" / "adapter")})
        },
    )
    out["merge_tiny"] = _ratio(merge_tiny, tiny_bytes, "tiny base, fp32")

    big, adapter = _random_llama(tmp / "big-llama", tiny, hidden=512 if quick else 768)
    big_overrides = [*overrides, ("base.name_or_path", str(big)), ("base.kind", "hub")]
    merge_big = run_python(
        _MERGE, env={"BENCH_ARGS": json.dumps({"overrides": big_overrides, "adapter": str(adapter)})}
    )
    out["merge_large"] = _ratio(merge_big, _weights_bytes(big), "random Llama, fp32")
    out["load_end"] = loadavg()
    return out


def _ratio(measured: dict[str, Any], model_bytes: int, what: str) -> dict[str, Any]:
    delta = measured["peak_rss"] - measured["baseline_rss"]
    return {
        **measured,
        "model": what,
        "model_bytes": model_bytes,
        "peak_minus_baseline": delta,
        "ratio": delta / model_bytes,
    }


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def _random_llama(out: Path, tokenizer_dir: Path, hidden: int) -> tuple[Path, Path]:
    """A random-weight Llama (12 layers, tiny-base tokenizer) and a random non-zero q/v LoRA adapter."""
    code = r"""
import json, os, sys, torch
from pathlib import Path
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
a = json.loads(os.environ["BENCH_ARGS"])
out, hidden = Path(a["out"]), a["hidden"]
tok = AutoTokenizer.from_pretrained(a["tokenizer"])
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                  num_hidden_layers=12, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                  max_position_embeddings=512, tie_word_embeddings=True,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
model.save_pretrained(out / "base")
tok.save_pretrained(out / "base")
peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
with torch.no_grad():
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.01)  # a trained adapter is not zero: the merge must change the weights
peft_model.save_pretrained(out / "adapter")
tok.save_pretrained(out / "adapter")
print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))
"""
    run_python(
        code,
        env={"BENCH_ARGS": json.dumps({"out": str(out), "hidden": hidden, "tokenizer": str(tokenizer_dir)})},
    )
    return out / "base", out / "adapter"
