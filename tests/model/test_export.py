"""Export stage: merge parity, ONNX (KV cache) parity, provider choice and verification, model card,
gate, atomicity.

The slow tests share one export of the tiny base + a LoRA adapter trained for a few steps here (so
lora_B is non-zero and the merge changes weights). That export runs with a faked provider list (ROCm
"installed" in this CPU build, so it cannot load) and `export.allow_cpu_fallback=true`: the fallback is
recorded. Parity failure runs a second export whose graph is corrupted on disk between writing and checking.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tasks.core.config import REPO_ROOT, Config, load_config
from tasks.core.errors import UserError
from tasks.plumbing.chat import ChatFormat
from tasks.plumbing.ort_runtime import (
    ProviderChoice,
    ProviderUnavailable,
    choose_provider,
    verify_session,
)

QUESTIONS = [
    ("What does len() return?", "The number of items."),
    (
        "Which keyword defines a function in Python, and what follows it on the same line?",
        "def, then the name.",
    ),
    ("What is a tuple?", "An immutable sequence."),
    ("How do you open a file for reading and make sure it is closed afterwards?", "Use a with statement."),
    ("What is None?", "The null object."),
]


# ------------------------------------------------------------------------------------- fast unit tests


def test_provider_auto_prefers_amd_then_cuda_then_cpu() -> None:
    cpu = ["CPUExecutionProvider"]
    assert choose_provider(cpu).name == "CPUExecutionProvider"
    assert choose_provider(["AzureExecutionProvider", *cpu]).providers == ("CPUExecutionProvider",)
    cuda = choose_provider(["CUDAExecutionProvider", *cpu])
    assert cuda.name == "CUDAExecutionProvider" and cuda.providers[-1] == "CPUExecutionProvider"
    assert (
        choose_provider(["CUDAExecutionProvider", "ROCMExecutionProvider", *cpu]).name
        == "ROCMExecutionProvider"
    )
    every = [
        "CPUExecutionProvider",
        "CUDAExecutionProvider",
        "ROCMExecutionProvider",
        "MIGraphXExecutionProvider",
    ]
    chosen = choose_provider(every)
    assert chosen.name == "MIGraphXExecutionProvider"
    assert "auto" in chosen.reason and chosen.to_dict()["available"] == every


def test_provider_override_and_unavailable() -> None:
    available = ["ROCMExecutionProvider", "CPUExecutionProvider"]
    assert choose_provider(available, "CPU").name == "CPUExecutionProvider"
    assert choose_provider(available, "ROCM").reason == "requested by export.provider"
    with pytest.raises(UserError, match=r"export\.provider: 'CUDA'.*onnxruntime-gpu"):
        choose_provider(available, "CUDA")
    with pytest.raises(UserError, match="MIGraphX"):
        choose_provider(["CPUExecutionProvider"], "MIGraphX")


def test_gpu_provider_that_did_not_load_fails_or_falls_back_when_allowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What the session really loaded decides, not what was asked for (faked provider lists)."""
    rocm = choose_provider(["ROCMExecutionProvider", "CPUExecutionProvider"])
    assert verify_session(["ROCMExecutionProvider", "CPUExecutionProvider"], rocm, False) is None
    with pytest.raises(ProviderUnavailable, match=r"could not load ROCMExecutionProvider \(") as err:
        verify_session(["CPUExecutionProvider"], rocm, allow_cpu_fallback=False)
    assert "\n" not in str(err.value) and "export.allow_cpu_fallback=true" in str(err.value)
    note = verify_session(["CPUExecutionProvider"], rocm, allow_cpu_fallback=True)
    assert note is not None and "ROCMExecutionProvider" in note
    assert any(r.levelname == "WARNING" and "running on the CPU" in r.getMessage() for r in caplog.records)
    cpu = ProviderChoice("CPUExecutionProvider", ("CPUExecutionProvider",), (), "test")
    assert verify_session(["CPUExecutionProvider"], cpu, False) is None


def test_memory_plan_refuses_and_places_merge() -> None:
    from tasks.stages.export import plan_memory as _plan_memory

    gib = 2**30
    n = 7_000_000_000  # 26 GiB of fp32 weights
    with pytest.raises(UserError, match=r"needs about \d+\.\d GiB of free RAM.*only 24\.0 GiB"):
        _plan_memory(n, "auto", cpu_available=24 * gib, gpu_available=None)
    big_ram = 200 * gib
    on_gpu = _plan_memory(n, "auto", cpu_available=big_ram, gpu_available=190 * gib)
    assert on_gpu["merge_device"] == "cuda" and on_gpu["weights_bytes"] == n * 4
    small_gpu = _plan_memory(n, "auto", cpu_available=big_ram, gpu_available=16 * gib)
    assert small_gpu["merge_device"] == "cpu" and "GPU has 16.00 GiB free" in small_gpu["reason"]
    assert _plan_memory(n, "cpu", cpu_available=big_ram, gpu_available=None)["merge_device"] == "cpu"


def test_quantized_base_is_refused(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from tasks.stages.export import load_base_config

    base = tmp_path / "gptq-base"
    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(base)
    raw = json.loads((base / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(raw))
    cfg = load_config(overrides=[f"base.name_or_path={base}", "base.kind=hub"])
    with pytest.raises(UserError, match=r"quantized checkpoint \(gptq\).*full-precision"):
        load_base_config(cfg, str(base))


def test_missing_inputs_are_user_errors(tmp_path: Path) -> None:
    from tasks.stages.export import export_model

    with pytest.raises(UserError, match=r"adapter_config\.json: not found; run `qa-lora train`"):
        export_model(load_config(), tmp_path)
    (tmp_path / "train" / "adapter").mkdir(parents=True)
    (tmp_path / "train" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"eval\.jsonl: not found"):
        export_model(load_config(), tmp_path)
    assert not (tmp_path / "export").exists()


def _fake_summary() -> dict[str, Any]:
    parity = {
        "max_abs_diff": 2e-7,
        "tokens_identical": True,
        "atol": 1e-4,
        "provider": "CPUExecutionProvider",
    }
    return {
        "fingerprint": "f00dfeed",
        "opset": 18,
        "parity": {"prompts": 4, "new_tokens": 8, "onnx": parity, "merge": {**parity, "atol": 1e-3}},
        "variants": {"int8": {"path": "onnx/int8/model.onnx", "top1_agreement": 0.97, "min_top1": 0.9}},
    }


def test_model_card_states_lineage_metrics_gate_and_loading(tmp_path: Path) -> None:
    from tasks.stages.export import render_model_card

    cfg = load_config()
    (tmp_path / "eval").mkdir()
    remote = "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/dvc?X-Amz-Signature=abcdef123456"
    (tmp_path / "version.json").write_text(json.dumps({"dataset_hash": "md5-abc123", "remote": remote}))
    (tmp_path / "eval" / "metrics.json").write_text(
        json.dumps({"base": {"token_f1": 0.21}, "candidate": {"token_f1": 0.4321}, "gate": {"passed": 1}})
    )
    gate = {
        "passed": False,
        "decision": "fail",
        "primary_metric": "token_f1",
        "reasons": ["token_f1 regressed by 0.05"],
    }
    card = render_model_card(cfg, tmp_path, _fake_summary(), gate)
    assert "Base model: `tiny-base (local)`" in card and str(REPO_ROOT) not in card
    assert "md5-abc123" in card and "bucket/dvc" in card
    assert "wJalrXUtnFEMI" not in card and "AKIAEXAMPLE" not in card and "abcdef123456" not in card
    assert cfg.params_hash() in card
    assert "candidate.token_f1 | 0.4321" in card
    assert "**fail**" in card and "token_f1 regressed by 0.05" in card
    assert "## Intended use and limits" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "load_onnx_generator" in card
    assert "top-1 agreement with fp32 0.9700" in card
    assert "CPU fallback" not in card


def test_model_card_front_matter_is_what_hubs_and_catalogs_read(tmp_path: Path) -> None:
    """huggingface_hub's own parser reads the card's metadata: base (a hub id, never a local path),
    library, license (configured, or the base's card), the DVC hash, the gated metrics."""
    from huggingface_hub import ModelCard

    from tasks.stages.export import render_model_card

    (tmp_path / "eval").mkdir()
    (tmp_path / "version.json").write_text(json.dumps({"dataset_hash": "md5-abc123"}))
    (tmp_path / "eval" / "metrics.json").write_text(
        json.dumps({"candidate": {"token_f1": 0.4321, "rouge_l": 0.5, "loss": 2.0}})
    )
    rules = [{"name": "max_general_ppl_increase", "value": 0.069, "passed": True}]
    gate = {"passed": True, "decision": "pass", "primary_metric": "token_f1", "reasons": [], "rules": rules}
    hub = load_config(overrides=[("base.kind", "hub"), ("base.name_or_path", "Qwen/Qwen2.5-7B-Instruct")])
    card = ModelCard(render_model_card(hub, tmp_path, _fake_summary(), gate, "transformers"))
    data = card.data
    assert data.base_model == "Qwen/Qwen2.5-7B-Instruct" and data.library_name == "transformers"
    assert data.license == "other" and data.datasets == ["dvc:md5-abc123"]
    assert data.pipeline_tag == "text-generation" and "gate:pass" in data.tags
    scores = {r.metric_type: r.metric_value for r in data.eval_results}
    assert scores == {"token_f1": 0.4321, "rouge_l": 0.5, "max_general_ppl_increase": 0.069}
    assert card.text.lstrip().startswith("# qa-lora: Q&A model (LoRA fine-tune of Qwen/Qwen2.5-7B-Instruct")

    # A local base: no base_model, its directory's name only, and its own card's license.
    base = tmp_path / "bases" / "my-base"
    base.mkdir(parents=True)
    (base / "README.md").write_text("---\nlicense: llama2\n---\n# my base\n")
    local = load_config(overrides=[("base.kind", "hub"), ("base.name_or_path", str(base))])
    text = render_model_card(local, tmp_path, _fake_summary(), gate)
    data = ModelCard(text).data
    assert data.base_model is None and data.license == "llama2" and data.library_name == "onnx"
    assert str(tmp_path) not in text and "my-base (local)" in text
    configured = load_config(
        overrides=[("base.kind", "hub"), ("base.name_or_path", str(base)), ("export.license", "apache-2.0")]
    )
    assert (
        ModelCard(render_model_card(configured, tmp_path, _fake_summary(), gate)).data.license == "apache-2.0"
    )


def test_model_card_states_missing_inputs_and_cpu_fallback(tmp_path: Path) -> None:
    from tasks.stages.export import render_model_card

    summary = _fake_summary()
    summary["provider"] = {
        "name": "CPUExecutionProvider",
        "cpu_fallback": "could not load ROCMExecutionProvider",
    }
    card = render_model_card(load_config(), tmp_path, summary, {"passed": True, "reasons": []})
    assert "Data version (DVC): not available" in card
    assert "Metrics: not available" in card
    assert "Regression gate: **pass**" in card
    assert "**CPU fallback**" in card and "could not load ROCMExecutionProvider" in card


# ------------------------------------------------------------------------------------ slow: one export


PASSING_GATE = {"passed": True, "decision": "pass", "primary_metric": "token_f1", "reasons": []}


def _fake_rocm_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """This CPU build reports ROCm as installed: its sessions then run on the CPU, as on a broken node."""
    import onnxruntime

    listed = ["ROCMExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(listed))


def _make_run(run_dir: Path, base: Path) -> None:
    """eval.jsonl, a passing gate + an adapter trained for a few steps on the tiny base: LoRA on q/v
    (lora_B non-zero) and, as params.yaml's default does, the tied embeddings trained in full."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.core.config import LoraSection
    from tasks.stages.train.model import lora_config

    (run_dir / "data").mkdir(parents=True)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "gate.json").write_text(json.dumps(PASSING_GATE))
    with (run_dir / "data" / "eval.jsonl").open("w", encoding="utf-8") as fh:
        for i, (q, a) in enumerate(QUESTIONS):
            fh.write(json.dumps({"id": f"q{i:02d}", "question": q, "answer": a, "category": "python"}) + "\n")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        lora_config(
            LoraSection(
                r=4,
                alpha=16,
                dropout=0.0,
                target_modules=("q_proj", "v_proj"),
                modules_to_save=("embed_tokens",),
            )
        ),
    )
    chat = ChatFormat(tokenizer)
    texts = [chat.example({"question": q, "answer": a})[0] for q, a in QUESTIONS]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(4):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    adapter = run_dir / "train" / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    chat.frame().save(adapter)  # what train writes beside an adapter: the chat format it was trained in


def _cfg(base: Path, *extra: str) -> Config:
    registry = tempfile.mkdtemp(prefix="qa-lora-export-registry-")  # empty: no champion to serve beside
    return load_config(
        overrides=[
            f"base.name_or_path={base}",
            f"register.tracking_uri=sqlite:///{registry}/mlflow.db",
            "export.parity_prompts=4",
            "export.parity_new_tokens=8",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def exported(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tasks.stages.export import export_model

    run_dir = tmp_path_factory.mktemp("export-run")
    _make_run(run_dir, tiny_base)
    cfg = _cfg(tiny_base, "export.variants=[int8]", "export.allow_cpu_fallback=true")
    with pytest.MonkeyPatch.context() as mp:
        _fake_rocm_installed(mp)
        result = export_model(cfg, run_dir)
    return {"run_dir": run_dir, "cfg": cfg, "result": result, "base": tiny_base}


@pytest.mark.slow
def test_merge_is_nontrivial_and_matches_adapter_on_base(exported: dict[str, Any]) -> None:
    from safetensors.numpy import load_file

    summary = json.loads(Path(exported["result"]["summary"]).read_text())
    merge = summary["parity"]["merge"]
    assert merge["max_abs_diff"] <= exported["cfg"].export.merge_atol
    assert merge["tokens_identical"] and merge["generated_tokens"] > 0
    merged = load_file(Path(exported["result"]["merged_dir"]) / "model.safetensors")
    base = load_file(exported["base"] / "model.safetensors")
    q = next(k for k in base if k.endswith("layers.0.self_attn.q_proj.weight"))
    k = next(k for k in base if k.endswith("layers.0.self_attn.k_proj.weight"))
    assert abs(merged[q] - base[q]).max() > 0, (
        "the adapter changed nothing: the merge parity would be vacuous"
    )
    assert (merged[k] == base[k]).all(), "only the LoRA target modules change"
    assert all(merged[name].dtype.name == "float32" for name in merged)
    gen_cfg = json.loads((Path(exported["result"]["merged_dir"]) / "generation_config.json").read_text())
    tok_cfg = json.loads((Path(exported["result"]["merged_dir"]) / "tokenizer_config.json").read_text())
    assert gen_cfg["eos_token_id"] != gen_cfg["pad_token_id"]
    assert tok_cfg["eos_token"] == "</s>" and tok_cfg["pad_token"] == "<pad>"


@pytest.mark.slow
def test_merged_model_reloads_with_its_trained_tied_embeddings(exported: dict[str, Any]) -> None:
    """The merged model as saved (what the registry keeps) answers like the adapter on the base: the
    embeddings trained in full are in it, and the output head, tied to them, reloads tied to them too."""
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = Path(exported["result"]["merged_dir"])
    weights = load_file(merged_dir / "model.safetensors")
    base_weights = load_file(exported["base"] / "model.safetensors")
    emb = next(k for k in base_weights if k.endswith("embed_tokens.weight"))
    assert abs(weights[emb] - base_weights[emb]).max() > 0, "the embeddings were not trained: vacuous"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(exported["base"], dtype=torch.float32),
        str(Path(exported["run_dir"]) / "train" / "adapter"),
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    prompts = [ChatFormat(tokenizer).prompt(q) for q, _ in QUESTIONS[:2]]
    ids = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        diff = (merged(**ids).logits - adapter(**ids).logits).abs().max().item()
    assert diff <= exported["cfg"].export.merge_atol, f"reloaded merged model vs adapter: {diff}"


@pytest.mark.slow
def test_onnx_parity_with_kv_cache_on_a_padded_batch(exported: dict[str, Any]) -> None:
    """The stage's own numbers, then an independent check: ORT greedy (prefill + 1-token cached steps) on
    prompts of different lengths equals transformers generate(), and padding does not change an answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.plumbing.onnx_generate import load_onnx_generator

    result = exported["result"]
    summary = json.loads(Path(result["summary"]).read_text())
    onnx_p = summary["parity"]["onnx"]
    assert result["tokens_identical"] and onnx_p["tokens_identical"]
    assert onnx_p["max_abs_diff"] <= exported["cfg"].export.logits_atol
    assert len(set(summary["parity"]["prompt_lengths"])) > 1, "parity batch must mix prompt lengths"

    gen = load_onnx_generator(result["onnx_dir"])
    assert len(gen.layout["cache"]) == 2 * gen.layout["num_layers"]
    prompts = [gen.chat.prompt(q) for q, _ in QUESTIONS[:3]]
    ort_out = gen.generate(prompts, max_new_tokens=10)

    tok = AutoTokenizer.from_pretrained(result["merged_dir"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(result["merged_dir"]).eval()
    enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any(), "the batch must need padding"
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    for row, ids in zip(out[:, enc["input_ids"].shape[1] :].tolist(), ort_out.token_ids, strict=True):
        expected = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
        assert ids == expected
    alone = gen.generate(prompts[1:2], max_new_tokens=10)
    assert alone.token_ids[0] == ort_out.token_ids[1] and alone.texts[0] == ort_out.texts[1]


@pytest.mark.slow
def test_export_artifacts_summary_and_card(exported: dict[str, Any]) -> None:
    run_dir, result = exported["run_dir"], exported["result"]
    export_dir = Path(result["export_dir"])
    onnx_dir = Path(result["onnx_dir"])
    for f in (
        "model.onnx",
        "model.onnx.data",
        "onnx_layout.json",
        "tokenizer.json",
        "README.md",
        "int8/model.onnx",
    ):
        assert (onnx_dir / f).is_file(), f
    # One card in three places; only the front matter's library differs (merged/ is a transformers model).
    from huggingface_hub import ModelCard

    cards = {d: ModelCard.load(Path(d) / "README.md") for d in (export_dir, result["merged_dir"], onnx_dir)}
    assert [c.data.library_name for c in cards.values()] == ["onnx", "transformers", "onnx"]
    assert len({c.text for c in cards.values()}) == 1 and str(run_dir) not in cards[export_dir].text
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".tmp-")]
    summary = json.loads((export_dir / "export_summary.json").read_text())
    # ROCm was listed but could not load; allowed, so the export ran on the CPU and says so everywhere.
    assert summary["provider"]["name"] == result["provider"] == "CPUExecutionProvider"
    assert "could not load ROCMExecutionProvider" in summary["provider"]["cpu_fallback"]
    assert result["cpu_fallback"] == summary["provider"]["cpu_fallback"]
    assert summary["parity"]["onnx"]["provider"] == "CPUExecutionProvider"
    assert summary["opset"] == 18 and summary["dtype"] == "float32"
    assert {"merge_s", "export_onnx_s", "onnx_parity_s", "total_s"} <= set(summary["timings_s"])
    assert summary["sizes_bytes"]["onnx_fp32"] > 0 and summary["sizes_bytes"]["merged"] > 0
    int8 = summary["variants"]["int8"]
    assert int8["passed"] and 0.9 <= int8["top1_agreement"] <= 1.0 and int8["size_bytes"] > 0
    card = (export_dir / "README.md").read_text()
    assert "**CPU fallback**" in card and "ROCMExecutionProvider" in card
    assert "r=4, alpha=16" in card  # from the adapter's own config, not params.yaml's r=8
    assert "target modules q_proj, v_proj; trained in full: embed_tokens" in card
    assert "Data version (DVC): not available" in card
    # Serving cost measured as served (a fresh process, no champion in this registry): in the summary,
    # the card and the DVC metrics.
    serving = summary["serving"]
    cand = serving["candidate"]
    assert serving["champion"] is None and serving["passed"] and serving["questions"] == len(QUESTIONS)
    assert cand["provider"] == "CPUExecutionProvider" and cand["requests"] == len(QUESTIONS)
    assert cand["new_tokens_b1"] > 0 and cand["tokens_per_s_b1"] > 0 and cand["tokens_per_s_b8"] > 0
    assert 0 < cand["latency_p50_ms"] <= cand["latency_p95_ms"]
    on_disk = sum(f.stat().st_size for f in onnx_dir.rglob("*") if f.is_file() and f.name != "README.md")
    assert cand["size_bytes"] == on_disk  # the int8 variant included: a server ships the directory
    weights = (onnx_dir / "model.onnx.data").stat().st_size
    assert cand["peak_rss_bytes"] > weights  # the process held the fp32 weights at least once
    assert [r["name"] for r in serving["rules"]] == ["max_latency_regression", "max_size_regression"]
    assert all(r["passed"] and "no champion" in r["detail"] for r in serving["rules"])
    assert "## Serving cost" in card and "tokens/s, batch 1" in card and "no champion yet" in card


@pytest.mark.slow
def test_rerun_with_same_inputs_is_idempotent(exported: dict[str, Any]) -> None:
    from tasks.stages.export import export_model

    before = {
        p: p.stat().st_mtime_ns for p in Path(exported["result"]["export_dir"]).rglob("*") if p.is_file()
    }
    again = export_model(exported["cfg"], exported["run_dir"])
    assert again["reused"] and again["fingerprint"] == exported["result"]["fingerprint"]
    after = {
        p: p.stat().st_mtime_ns for p in Path(exported["result"]["export_dir"]).rglob("*") if p.is_file()
    }
    assert before == after

    # A new gate result changes the model card: the export is redone, not reused. This time the real
    # provider list (CPU only) is used: nothing to fall back from.
    gate = {**PASSING_GATE, "reasons": ["re-evaluated against a new champion"]}
    (exported["run_dir"] / "eval" / "gate.json").write_text(json.dumps(gate))
    redone = export_model(exported["cfg"], exported["run_dir"])
    assert not redone["reused"] and redone["fingerprint"] != again["fingerprint"]
    card = Path(redone["model_card"]).read_text()
    assert "Regression gate: **pass**" in card and "re-evaluated against a new champion" in card
    assert redone["cpu_fallback"] is None and "CPU fallback" not in card


@pytest.mark.slow
def test_parity_failure_fails_the_stage_and_leaves_no_export(
    exported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph corrupted after it is written (one weight tensor overwritten) must be caught by parity."""
    import numpy as np

    import tasks.stages.export.stage as export_mod
    from tasks.stages.export import ExportParityError, export_model

    run_dir = tmp_path / "run"
    for part in ("data", "train", "eval"):
        shutil.copytree(exported["run_dir"] / part, run_dir / part)
    original = export_mod.export_onnx

    def corrupting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        layout = original(*args, **kwargs)
        data = Path(args[3]) / "model.onnx.data"
        raw = np.fromfile(data, dtype=np.float32)
        raw[: len(raw) // 3] = np.random.default_rng(0).normal(0, 1, len(raw) // 3).astype(np.float32)
        raw.tofile(data)
        return layout

    monkeypatch.setattr(export_mod, "export_onnx", corrupting)
    with pytest.raises(
        ExportParityError, match=r"ONNX .*parity failed: max \|logit diff\| [0-9.e+-]+ > atol"
    ):
        export_model(exported["cfg"], run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["data", "eval", "train"]


def _run_without_model(run_dir: Path, gate: dict[str, Any] | None) -> None:
    """An adapter config and an eval split (what the input check looks at) and, if given, a gate."""
    (run_dir / "train" / "adapter").mkdir(parents=True)
    (run_dir / "train" / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "data").mkdir()
    (run_dir / "data" / "eval.jsonl").write_text(
        '{"id": "1", "question": "q", "answer": "a", "category": "c"}\n'
    )
    if gate is not None:
        (run_dir / "eval").mkdir()
        (run_dir / "eval" / "gate.json").write_text(json.dumps(gate))


def test_failed_gate_exports_nothing(tmp_path: Path) -> None:
    """`qa-lora export` / `dvc repro` after a failed gate refuse, like the DAG's gate task."""
    from tasks.stages.export import export_model

    _run_without_model(tmp_path, {"passed": False, "reasons": ["token_f1: CI lower bound -0.02 <= 0.0"]})
    with pytest.raises(UserError, match=r"gate failed: token_f1: CI lower bound -0\.02 <= 0\.0\. Nothing"):
        export_model(load_config(), tmp_path)
    assert not (tmp_path / "export").exists()


def test_missing_gate_exports_nothing(tmp_path: Path) -> None:
    """No gate.json (evaluate never ran) is refused too: one strictness for every reader of the gate."""
    from tasks.stages.export import export_model

    _run_without_model(tmp_path, gate=None)
    with pytest.raises(UserError, match=r"gate\.json: not found; the evaluate stage"):
        export_model(load_config(), tmp_path)
    assert not (tmp_path / "export").exists()


def test_gpu_provider_that_cannot_load_stops_the_export_before_any_work(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ROCm listed but not loadable, no fallback allowed: one line naming the provider, nothing written."""
    from tasks.stages.export import export_model

    _run_without_model(tmp_path, PASSING_GATE)
    _fake_rocm_installed(monkeypatch)
    with pytest.raises(ProviderUnavailable) as err:
        export_model(_cfg(tiny_base), tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "could not load ROCMExecutionProvider" in message and "export.allow_cpu_fallback" in message
    # this CPU build has no ROCm provider library at all: the reason says so
    assert "libonnxruntime_providers_rocm.so is not part of this onnxruntime build" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "eval", "train"]
