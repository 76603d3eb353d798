"""The register stage on a real MLflow SQLite registry: lineage, aliases, idempotence, check-and-set.

Run directories are structurally real but tiny (real safetensors, real ONNX graphs with external data);
the end-to-end round trip through onnxruntime uses the real export when tasks/export.py exists.
One registry (database + artifact root) is shared by the module because creating it costs seconds;
each test gets its own registered model name, so tests do not see each other's aliases.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from champion_fixture import stand_in_chat_format

from tasks.core.config import Config, load_config, save_config
from tasks.core.errors import UserError
from tasks.stages.evaluate.harness import harness_rule


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh SQLite registry URI, created once (schema migrations take seconds)."""
    from tasks.plumbing.tracking import setup_mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    setup_mlflow(_cfg(uri, "warmup"))
    return uri


@pytest.fixture
def cfg_for(registry: str, request: pytest.FixtureRequest) -> Any:
    """cfg_for(**overrides) -> Config on the shared registry, with a model name unique to the test."""
    name = request.node.name.replace("[", "-").replace("]", "")

    def make(**overrides: Any) -> Config:
        return _cfg(registry, name, **overrides)

    return make


def _cfg(uri: str, model_name: str, **overrides: Any) -> Config:
    pairs = [("register.tracking_uri", uri), ("register.model_name", model_name)]
    pairs += [(f"register.{k}", v) for k, v in overrides.items()]
    return load_config(overrides=pairs)


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _write_onnx(out: Path) -> None:
    """A real (tiny) ONNX graph whose weight lives in an external data file, as big exports do."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(1, 8), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(
        model,
        str(out / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )


def make_run(
    root: Path,
    name: str = "run",
    *,
    passed: bool = True,
    champion_version: str | None = None,
    f1: float = 0.5,
    dataset_hash: str = "d41d8cd98f00b204e9800998ecf8427e",
) -> Path:
    """A structurally real run directory: adapter, merged model, ONNX export, reports, gate."""
    import numpy as np
    from safetensors.numpy import save_file

    run = root / name
    adapter, merged, onnx_dir = run / "train/adapter", run / "export/merged", run / "export/onnx"
    for d in (adapter, merged, onnx_dir, run / "eval", run / "reports"):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))  # distinct weights per run
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    save_file(
        {"lora_A": rng.standard_normal((8, 4), dtype=np.float32)}, str(adapter / "adapter_model.safetensors")
    )
    (merged / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (merged / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    save_file({"w": rng.standard_normal((4, 4), dtype=np.float32)}, str(merged / "model.safetensors"))
    _write_onnx(onnx_dir)
    (onnx_dir / "onnx_layout.json").write_text(json.dumps({"format": "qa-lora-onnx-kv/1"}))
    stand_in_chat_format(onnx_dir)
    (onnx_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    gate = {
        "passed": passed,
        "decision": "pass" if passed else "fail",
        "primary_metric": "token_f1",
        "rules": [
            {"name": "improves_on_base", "passed": passed, "value": 0.1, "threshold": 0.0, "detail": ""},
            harness_rule(
                {"qa_lora_mc": {"metric": "acc_norm", "value": 0.38, "stderr": 0.03}},
                {"qa_lora_mc": {"metric": "acc_norm", "value": 0.275, "stderr": 0.03}},
                0.05,
            ),
        ],
        "reasons": [] if passed else ["token_f1 lower CI bound -0.02 <= 0.0"],
        "champion_version": champion_version,
        "metrics": {
            "base": {"token_f1": 0.2},
            "candidate": {"token_f1": f1, "rouge_l": {"mean": 0.4}},
            "champion": None,
        },
    }
    (run / "eval/gate.json").write_text(json.dumps(gate))
    (run / "eval/metrics.json").write_text(json.dumps(gate["metrics"]))
    (run / "eval/eval_report.md").write_text("# eval\n")
    (run / "version.json").write_text(json.dumps({"dataset_hash": dataset_hash, "remote": "dvc-remote"}))
    (run / "export/export_summary.json").write_text(json.dumps({"provider": "CPUExecutionProvider"}))
    (run / "export/README.md").write_text("# model card\n")
    (run / "train/train_summary.json").write_text(json.dumps({"train_loss": 1.0}))
    (run / "reports/data_quality.json").write_text(json.dumps({"rows": 100}))
    save_config(load_config(), run / "params.effective.yaml")
    return run


def _versions(name: str) -> list[Any]:
    return _client().search_model_versions(f"name = '{name}'")


def test_register_is_idempotent_and_records_lineage(cfg_for: Any, tmp_path: Path) -> None:
    from tasks.stages.register import register_model

    cfg = cfg_for()
    run = make_run(tmp_path)
    first = register_model(cfg, run)
    second = register_model(cfg, run)  # an Airflow retry

    assert second["version"] == first["version"] and first["created"] and not second["created"]
    assert len(_versions(cfg.register.model_name)) == 1
    assert first["promoted"] and set(first["aliases"]) == {"candidate", "champion"}
    assert second["promoted"] and second["mlflow_run_id"] == first["mlflow_run_id"]
    saved = json.loads((run / "register/registration.json").read_text())
    assert saved["version"] == first["version"] and saved["uris"]["champion"].endswith("@champion")
    assert not saved["missing_reports"]

    tags = _client().get_model_version(cfg.register.model_name, first["version"]).tags
    assert tags["qa_lora.run_id"] == first["run_id"] and first["run_id"].startswith("run-")
    assert tags["qa_lora.dataset_hash"] == "d41d8cd98f00b204e9800998ecf8427e"
    assert tags["qa_lora.params_hash"] == cfg.params_hash()
    assert tags["qa_lora.base_model"] == cfg.base.name_or_path
    assert tags["qa_lora.gate.decision"] == "pass"
    assert len(tags["qa_lora.git_commit"]) in (40, 7) or tags["qa_lora.git_commit"] == "unknown"
    assert float(tags["qa_lora.metric.token_f1"]) == 0.5 and float(tags["qa_lora.metric.rouge_l"]) == 0.4
    # the lm-evaluation-harness task's figures reach the version and its MLflow run
    assert float(tags["qa_lora.metric.harness_qa_lora_mc_acc_norm"]) == 0.38
    logged = _client().get_run(first["mlflow_run_id"]).data.metrics
    assert logged["harness_qa_lora_mc_acc_norm"] == 0.38
    assert logged["harness_qa_lora_mc_acc_norm_change"] == pytest.approx(0.105)


def test_failed_or_missing_gate_registers_nothing(cfg_for: Any, tmp_path: Path) -> None:
    from tasks.stages.register import register_model

    cfg = cfg_for()
    failed = make_run(tmp_path, "failed", passed=False)
    with pytest.raises(UserError, match="gate failed"):
        register_model(cfg, failed)
    missing = make_run(tmp_path, "nogate")
    (missing / "eval/gate.json").unlink()
    with pytest.raises(UserError, match=r"gate\.json: not found"):
        register_model(cfg, missing)
    assert _versions(cfg.register.model_name) == []
    assert not (failed / "register").exists() and not (missing / "register").exists()


@pytest.mark.parametrize(
    ("broken", "named"),
    [
        ("train/adapter/adapter_model.safetensors", "adapter_model.safetensors"),
        ("export/merged/model.safetensors", "model.safetensors"),
        ("export/onnx/model.onnx", "no .onnx graph"),
        ("export/onnx/model.onnx.data", "model.onnx.data"),
        ("export/onnx/onnx_layout.json", "onnx_layout.json"),
        ("version.json", "version.json"),
        ("export/README.md", "README.md"),
    ],
)
def test_incomplete_artifacts_are_refused(cfg_for: Any, tmp_path: Path, broken: str, named: str) -> None:
    from tasks.stages.register import register_model

    cfg = cfg_for()
    run = make_run(tmp_path)
    (run / broken).unlink()
    with pytest.raises(UserError, match=re.escape(named)):
        register_model(cfg, run)
    assert _versions(cfg.register.model_name) == []


def test_truncated_onnx_external_data_is_refused(cfg_for: Any, tmp_path: Path) -> None:
    from tasks.stages.register import register_model

    run = make_run(tmp_path)
    data = run / "export/onnx/model.onnx.data"
    data.write_bytes(data.read_bytes()[:4])  # a half-copied weight file
    with pytest.raises(UserError, match="shorter than"):
        register_model(cfg_for(), run)


def test_promotion_waits_for_approval_then_promote_by_version(cfg_for: Any, tmp_path: Path) -> None:
    from tasks.stages.register import promote_version, register_model

    cfg = cfg_for(require_approval=True)
    reg = register_model(cfg, make_run(tmp_path))
    assert not reg["promoted"] and reg["promotion"] == "pending" and reg["aliases"] == ["candidate"]
    assert "qa-lora promote" in reg["reason"]
    assert (
        register_model(cfg_for(), make_run(tmp_path, "forced-off"), promote=False)["promotion"] == "pending"
    )

    out = promote_version(cfg, reg["version"], reason="reviewed eval report", actor="alice")
    assert out["promoted"] and out["champion"] == reg["version"] and out["previous"] is None
    client = _client()
    tags = client.get_model_version(cfg.register.model_name, reg["version"]).tags
    assert (
        tags["qa_lora.promoted_by"] == "alice" and tags["qa_lora.promotion_reason"] == "reviewed eval report"
    )
    assert tags["qa_lora.promoted_at"].endswith("Z")
    description = client.get_registered_model(cfg.register.model_name).description
    assert f"promote v{reg['version']}" in description and "by alice: reviewed eval report" in description

    with pytest.raises(UserError, match="does not exist"):
        promote_version(cfg, "99", reason="typo", actor="alice")


def test_dag_approval_path_promotes_run_with_check_and_set(cfg_for: Any, tmp_path: Path) -> None:
    from tasks.stages.register import promote_run, promote_version, register_model

    cfg = cfg_for(require_approval=True)
    with pytest.raises(UserError, match=r"registration\.json: missing"):
        promote_run(cfg, make_run(tmp_path, "unregistered"), actor="dave")
    first, second = make_run(tmp_path, "first"), make_run(tmp_path, "second")
    v1 = register_model(cfg, first)["version"]
    v2 = register_model(cfg, second)["version"]  # both gates compared against no champion
    out = promote_run(cfg, first, actor="dave", reason="eval report looks right")
    assert out["promoted"] and out["champion_after"] == v1 and "champion" in out["aliases"]
    assert json.loads((first / "register/registration.json").read_text())["promotion"] == "promoted"
    # The second approval comes after v1 became champion: its gate result is stale.
    late = promote_run(cfg, second, actor="dave")
    assert not late["promoted"] and late["promotion"] == "refused" and late["champion_after"] == v1
    assert json.loads((second / "register/registration.json").read_text())["promotion"] == "refused"
    # A person can still override by version (`qa-lora promote`).
    assert promote_version(cfg, v2, reason="override", actor="erin")["promoted"]


def test_champion_changed_since_gate_is_not_promoted(cfg_for: Any, tmp_path: Path) -> None:
    from tasks.stages.register import promote_version, register_model

    cfg = cfg_for()
    v1 = register_model(cfg, make_run(tmp_path, "a"))["version"]
    # This candidate's gate ran before v1 became champion (it compared against no champion).
    stale = register_model(cfg, make_run(tmp_path, "b", champion_version=None))
    assert not stale["promoted"] and stale["promotion"] == "refused" and "champion changed" in stale["reason"]
    assert stale["aliases"] == ["candidate"] and stale["champion_after"] == v1
    tags = _client().get_model_version(cfg.register.model_name, stale["version"]).tags
    assert tags["qa_lora.promotion"] == "refused" and "champion changed" in tags["qa_lora.promotion_reason"]
    # The DAG's post-approval path applies the same check; a person overriding does not.
    assert not promote_version(cfg, stale["version"], "approved", "bob", if_champion_unchanged=True)[
        "promoted"
    ]

    fresh = register_model(cfg, make_run(tmp_path, "c", champion_version=v1))
    assert fresh["promoted"] and fresh["champion_before"] == v1
    assert _client().get_model_version_by_alias(cfg.register.model_name, "previous").version == int(v1)


def test_concurrent_candidates_against_one_champion_promote_once(cfg_for: Any, tmp_path: Path) -> None:
    from tasks.stages.register import register_model

    cfg = cfg_for()
    v1 = register_model(cfg, make_run(tmp_path, "a"))["version"]
    runs = [make_run(tmp_path, f"racer{i}", champion_version=v1) for i in range(2)]
    barrier = threading.Barrier(2)

    def go(run: Path) -> dict[str, Any]:
        barrier.wait()
        return register_model(cfg, run)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(go, runs))
    assert sorted(r["promotion"] for r in results) == ["promoted", "refused"]
    winner = next(r for r in results if r["promoted"])
    assert _client().get_model_version_by_alias(cfg.register.model_name, "champion").version == int(
        winner["version"]
    )


def test_rollback_restores_previous_and_sticks(cfg_for: Any, tmp_path: Path) -> None:
    from tasks.stages.register import register_model, rollback_champion

    cfg = cfg_for()
    with pytest.raises(UserError, match="no champion"):
        rollback_champion(cfg, reason="oops", actor="carol")
    v1 = register_model(cfg, make_run(tmp_path, "a"))["version"]
    with pytest.raises(UserError, match="no previous champion"):
        rollback_champion(cfg, reason="oops", actor="carol")
    run_b = make_run(tmp_path, "b", champion_version=v1)
    v2 = register_model(cfg, run_b)["version"]
    run_c = make_run(tmp_path, "c", champion_version=v2)
    v3 = register_model(cfg, run_c)["version"]

    out = rollback_champion(cfg, reason="bad answers in prod", actor="carol")
    assert (out["champion"], out["rolled_back"], out["previous"]) == (v2, v3, v1)
    tags = _client().get_model_version(cfg.register.model_name, v3).tags
    assert (
        tags["qa_lora.rolled_back_by"] == "carol" and tags["qa_lora.rollback_reason"] == "bad answers in prod"
    )
    # An Airflow retry of the rolled-back run's register task must not undo the rollback.
    again = register_model(cfg, run_c)
    assert again["version"] == v3 and not again["promoted"] and again["champion_after"] == v2

    out = rollback_champion(cfg, reason="still bad", actor="carol")
    assert (out["champion"], out["previous"]) == (v1, None)
    with pytest.raises(UserError, match="no previous champion"):
        rollback_champion(cfg, reason="again", actor="carol")
    assert "rollback v2 -> v1 by carol" in _client().get_registered_model(cfg.register.model_name).description


def test_fetch_champion_none_then_the_tree(cfg_for: Any, tmp_path: Path) -> None:
    from tasks.stages.register import fetch_champion, register_model

    cfg = cfg_for()
    assert fetch_champion(cfg, tmp_path / "champ") is None  # no registered model at all
    register_model(cfg, make_run(tmp_path, "pending"), promote=False)
    assert fetch_champion(cfg, tmp_path / "champ") is None  # a model, but no champion

    reg = register_model(cfg, make_run(tmp_path, "a", dataset_hash="abc123"))
    got = fetch_champion(cfg, tmp_path / "champ")
    assert got is not None
    assert (got["version"], got["run_id"], got["dataset_hash"]) == (reg["version"], reg["run_id"], "abc123")
    assert Path(got["merged_path"], "model.safetensors").is_file()
    assert {p.name for p in Path(got["onnx_path"]).iterdir()} >= {"model.onnx", "model.onnx.data"}
    assert Path(got["path"], "README.md").is_file()
    assert Path(got["path"], "reports/eval/gate.json").is_file()
    assert Path(got["path"], "reports/version.json").is_file()
    assert Path(got["path"], "adapter/adapter_config.json").is_file()
    stamp = Path(got["merged_path"], "model.safetensors").stat().st_mtime_ns
    assert fetch_champion(cfg, tmp_path / "champ") == got  # same version: reused, not downloaded again
    assert Path(got["merged_path"], "model.safetensors").stat().st_mtime_ns == stamp


def test_models_uri_downloads_the_artifact_tree(cfg_for: Any, tmp_path: Path) -> None:
    from mlflow.artifacts import download_artifacts

    from tasks.stages.register import register_model

    cfg = cfg_for()
    register_model(cfg, make_run(tmp_path))
    out = Path(
        download_artifacts(f"models:/{cfg.register.model_name}@champion", dst_path=str(tmp_path / "dl"))
    )
    assert {p.name for p in out.iterdir()} >= {"adapter", "merged", "onnx", "reports", "README.md"}


def test_cli_promote_and_rollback(cfg_for: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tasks.runners.cli import main
    from tasks.stages.register import register_model

    cfg = cfg_for(promote=False)
    v1 = register_model(cfg, make_run(tmp_path, "a"))["version"]
    v2 = register_model(cfg, make_run(tmp_path, "b"))["version"]
    sets = ["--set", f"register.tracking_uri={cfg.register.tracking_uri}"]
    sets += ["--set", f"register.model_name={cfg.register.model_name}"]
    capsys.readouterr()
    assert main(["rollback", *sets]) == 2  # nothing promoted yet: one line, exit 2
    assert "no champion" in capsys.readouterr().err
    assert main(["promote", v1, "--reason", "first", *sets]) == 0
    capsys.readouterr()
    assert main(["promote", v2, "--reason", "second", *sets]) == 0
    assert json.loads(capsys.readouterr().out)["previous"] == v1
    assert main(["rollback", "--reason", "regression", *sets]) == 0
    assert json.loads(capsys.readouterr().out)["champion"] == v1


@pytest.mark.slow
def test_champion_round_trip_generates_with_onnxruntime(
    tiny_base: Path, registry: str, tmp_path: Path
) -> None:
    """Real export of a real (random-LoRA) adapter -> register -> models:/NAME@champion -> onnxruntime
    greedy tokens identical to PyTorch's greedy tokens from the downloaded merged model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.plumbing.chat import ChatFormat
    from tasks.plumbing.onnx_generate import load_onnx_generator
    from tasks.stages.export import export_model
    from tasks.stages.register import fetch_champion, register_model

    run = make_run(tmp_path, "rt")  # reports and gate; adapter/export are replaced by real ones below
    for rel in ("train/adapter", "export"):
        shutil.rmtree(run / rel)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), lora)
    model.save_pretrained(run / "train/adapter")
    tokenizer.save_pretrained(run / "train/adapter")
    chat = ChatFormat(tokenizer)
    chat.frame().save(run / "train/adapter")  # what training records beside an adapter
    questions = ["What does zip() return?", "How do I open a file?", "What is a list?"]
    rows = [{"id": str(i), "question": q, "answer": "x", "category": "c"} for i, q in enumerate(questions)]
    (run / "data").mkdir()
    (run / "data/eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        ("register.tracking_uri", registry),
        ("register.model_name", "round-trip"),
        ("base.name_or_path", str(tiny_base)),
        ("export.parity_prompts", 2),
        ("export.parity_new_tokens", 4),
        ("runtime.device", "cpu"),
        ("eval.cache_dir", None),  # the champion is downloaded into a temporary directory, not the repo's
    ]
    cfg = load_config(overrides=overrides)
    export_model(cfg, run)
    reg = register_model(cfg, run)
    assert reg["promoted"]
    # the serving cost the export measured: on the version (tags) and its MLflow run (metrics)
    import mlflow

    measured = json.loads((run / "export" / "export_summary.json").read_text())["serving"]["candidate"]
    client = mlflow.MlflowClient(tracking_uri=registry, registry_uri=registry)
    mv = client.get_model_version("round-trip", reg["version"])
    run_metrics = client.get_run(mv.run_id).data.metrics
    for key in ("tokens_per_s_b1", "latency_p95_ms", "size_bytes", "peak_rss_bytes"):
        assert float(mv.tags[f"qa_lora.serving.{key}"]) == pytest.approx(measured[key], rel=1e-5)
        assert run_metrics[f"serving.{key}"] == pytest.approx(measured[key])

    champ = fetch_champion(cfg, tmp_path / "champion")
    assert champ is not None and champ["version"] == reg["version"]
    prompts = [chat.prompt(q) for q in questions]
    onnx_out = load_onnx_generator(champ["onnx_path"], provider="CPU").generate(prompts, max_new_tokens=8)

    tok = AutoTokenizer.from_pretrained(champ["merged_path"])
    tok.padding_side = "left"
    merged = AutoModelForCausalLM.from_pretrained(champ["merged_path"], dtype=torch.float32).eval()
    enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = merged.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    eos = tok.eos_token_id
    torch_ids = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        torch_ids.append(row[: row.index(eos) + 1] if eos in row else row)
    assert onnx_out.token_ids == torch_ids and any(torch_ids)
    _next_export_is_served_beside_the_champion(run, overrides, reg["version"], tmp_path)


def _next_export_is_served_beside_the_champion(
    run: Path, overrides: list[tuple[str, Any]], champion: str, tmp_path: Path
) -> None:
    """The next export measures its serving cost beside the registered champion's downloaded ONNX: with
    an int8 variant in its onnx/ it serves more bytes than the champion by more than
    gate.max_size_regression (10%) allows and is refused, nothing written; the same model without the
    variant passes, the champion's version and figures recorded beside its own."""
    from tasks.core.layout import GateFailed
    from tasks.stages.export import export_model

    nxt = tmp_path / "next"
    shutil.copytree(run, nxt, ignore=shutil.ignore_patterns("export", "register"))
    bigger = load_config(overrides=[*overrides, ("export.variants", ["int8"])])
    with pytest.raises(GateFailed, match=rf"max_size_regression: candidate .* MiB vs champion v{champion} "):
        export_model(bigger, nxt)
    assert not (nxt / "export").exists()

    summary = json.loads(Path(export_model(load_config(overrides=overrides), nxt)["summary"]).read_text())
    serving = summary["serving"]
    assert serving["passed"] and serving["champion"]["version"] == str(champion)
    rules = {r["name"]: r for r in serving["rules"]}
    assert rules["max_size_regression"]["value"] == pytest.approx(0.0, abs=0.01)  # same architecture
    assert serving["champion"]["tokens_per_s_b1"] > 0 and serving["champion"]["new_tokens_b1"] > 0
    assert serving["repeats"] == 2 and serving["questions"] == 3
    card = (nxt / "export" / "README.md").read_text()
    assert f"champion v{champion}" in card and "PASS `max_size_regression`" in card
