"""The registered version is an MLflow Model: `mlflow.pyfunc.load_model("models:/NAME@champion")` answers
with the ONNX export on onnxruntime (no torch or transformers imported), token for token what the
project's generator and PyTorch greedy decoding give, within limits recorded in the MLmodel.

One real champion per module (tests/champion_fixture.py): tiny base + random LoRA -> export -> register.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from champion_fixture import QUESTIONS, build_champion

from tasks.plumbing.chat import ChatFormat

NEW_TOKENS = 12


def test_serving_tokenizer_encodes_and_decodes_like_transformers(tiny_base: Path) -> None:
    """`tokenizers` alone (what serving has) gives the ids, left padding and decoded text of the project's
    transformers tokenizer, non-ASCII text included."""
    from transformers import AutoTokenizer

    from tasks.plumbing.loading import apply_pad_rule
    from tasks.plumbing.serving import FastTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_base)
    apply_pad_rule(hf, str(tiny_base))
    hf.padding_side = "left"
    fast = FastTokenizer(tiny_base / "tokenizer.json", hf.pad_token_id)
    hf.chat_template = AutoTokenizer.from_pretrained(tiny_base).chat_template
    chat = ChatFormat(hf)
    prompts = [chat.prompt(q) for q in [*QUESTIONS, "Qu'est-ce qu'un dict ? 日本語 é", "x"]]
    want = hf(prompts, padding=True, return_tensors="np", add_special_tokens=False)
    got = fast(prompts)
    assert (want["attention_mask"] == 0).any()
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["attention_mask"].tolist() == want["attention_mask"].tolist()
    for row in want["input_ids"].tolist():
        ids = [*row, hf.eos_token_id]
        assert fast.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def champion(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import mlflow

    built = build_champion(tmp_path_factory.mktemp("pyfunc"), tiny_base)
    mlflow.set_tracking_uri(built["tracking_uri"])
    built["uri"] = f"models:/{built['model_name']}@champion"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built["model"] = mlflow.pyfunc.load_model(built["uri"])
    # A user loading the model sees no warning (MLflow's "Add type hints to the `predict` method" was one).
    assert not [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return built


@pytest.mark.slow
def test_champion_answers_equal_the_onnx_generator_and_pytorch_greedy(champion: dict[str, Any]) -> None:
    """Batch of eval questions (mixed lengths, so left padding): pyfunc answers == OnnxGenerator (with the
    transformers tokenizer) == PyTorch greedy on the merged model; and the token ids agree too."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.plumbing.onnx_generate import load_onnx_generator
    from tasks.plumbing.serving import Answerer

    out = champion["model"].predict(
        pd.DataFrame({"question": QUESTIONS}), params={"max_new_tokens": NEW_TOKENS}
    )
    answers = out["answer"].tolist()

    generator = load_onnx_generator(champion["onnx_dir"], provider="CPU")
    prompts = [generator.chat.prompt(q) for q in QUESTIONS]
    reference = generator.generate(prompts, NEW_TOKENS)
    assert answers == reference.texts
    ours = Answerer(champion["onnx_dir"]).generator.generate(prompts, NEW_TOKENS)
    assert ours.token_ids == reference.token_ids and any(reference.token_ids)

    tok = AutoTokenizer.from_pretrained(champion["merged_dir"], padding_side="left")
    merged = AutoModelForCausalLM.from_pretrained(champion["merged_dir"], dtype=torch.float32).eval()
    enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any(), "the batch must need padding"
    with torch.no_grad():
        gen = merged.generate(
            **enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
        )
    torch_ids = []
    for row in gen[:, enc["input_ids"].shape[1] :].tolist():
        torch_ids.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    assert ours.token_ids == torch_ids


@pytest.mark.slow
def test_dict_input_single_question_and_max_new_tokens_param(champion: dict[str, Any]) -> None:
    """`{"question": [...]}` works like a DataFrame; one question alone answers as in a padded batch;
    `max_new_tokens` reaches the generator (answers equal the reference generator's at that budget)."""
    from tasks.plumbing.onnx_generate import load_onnx_generator

    model = champion["model"]
    batch = model.predict({"question": QUESTIONS[:2]}, params={"max_new_tokens": NEW_TOKENS})
    one = model.predict({"question": [QUESTIONS[1]]}, params={"max_new_tokens": NEW_TOKENS})
    assert one["answer"].tolist() == batch["answer"].tolist()[1:2], "padding must not change an answer"
    reference = load_onnx_generator(champion["onnx_dir"], provider="CPU")
    prompts = [reference.chat.prompt(q) for q in QUESTIONS[:2]]
    for budget in (1, 3):
        short = model.predict({"question": QUESTIONS[:2]}, params={"max_new_tokens": budget})
        assert short["answer"].tolist() == reference.generate(prompts, budget).texts
    default = model.predict({"question": QUESTIONS[:1]})
    assert isinstance(default["answer"][0], str)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("data", "params", "named"),
    [
        ({"question": ["What is a list?"]}, {"max_new_tokens": 100_000}, "max_new_tokens=100000"),
        ({"question": ["What is a list?"]}, {"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"question": ["What is a list?"] * 17}, None, "17 rows"),
        ({"question": ["x" * 1_000_000]}, None, "1000000 characters"),
        ({"question": ["   "]}, None, "empty"),
    ],
)
def test_requests_outside_the_limits_are_refused(
    champion: dict[str, Any], data: dict[str, Any], params: dict[str, Any] | None, named: str
) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as err:
        champion["model"].predict(data, params=params)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert named in err.value.message


@pytest.mark.slow
def test_mlmodel_signature_limits_requirements_and_tree(champion: dict[str, Any], tmp_path: Path) -> None:
    """The version's tree: an MLmodel (python_function, signature with the param, limits, pinned
    requirements without torch) beside the tree the registry always held (adapter, merged, onnx, reports,
    model card), the ONNX weights uploaded once; fetch_champion still reads it."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    from tasks.plumbing.registry import fetch_champion
    from tasks.plumbing.serving import ServingLimits

    tree = Path(download_artifacts(artifact_uri=champion["uri"], dst_path=str(tmp_path / "tree")))
    for part in ("MLmodel", "README.md", "adapter", "merged", "onnx", "reports", "requirements.txt"):
        assert (tree / part).exists(), part
    outside = [p for p in tree.rglob("*.onnx*") if p.relative_to(tree).parts[0] != "onnx"]
    assert not outside, f"the ONNX graph and weights must be stored once, under onnx/: {outside}"
    mlmodel = Model.load(str(tree))
    assert mlmodel.flavors["python_function"]["artifacts"]["onnx"]["path"] == "onnx"
    sig = mlmodel.signature
    assert sig.inputs.input_names() == ["question"] and sig.outputs.input_names() == ["answer"]
    (param,) = sig.params.params
    limits = ServingLimits.from_dict(mlmodel.metadata["qa_lora_serving_limits"])
    assert (param.name, param.default) == ("max_new_tokens", limits.default_max_new_tokens)
    reqs = (tree / "requirements.txt").read_text()
    for name in ("onnxruntime==", "tokenizers==", "numpy=="):
        assert name in reqs, reqs
    assert "torch" not in reqs and "transformers" not in reqs
    assert json.loads((tree / "serving_input_example.json").read_text())
    fetched = fetch_champion(champion["cfg"], tmp_path / "fetched")
    assert fetched is not None and fetched["version"] == champion["registration"]["version"]


_NO_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked: serving must not import it")
sys.meta_path.insert(0, Block())
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict({"question": sys.argv[2:]}, params={"max_new_tokens": 6})
print(out["answer"].tolist())
"""


@pytest.mark.slow
def test_load_and_predict_import_neither_torch_nor_transformers(
    champion: dict[str, Any], tmp_path: Path
) -> None:
    """A fresh process that cannot import torch or transformers loads the champion and answers."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion["tracking_uri"]}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, champion["uri"], *QUESTIONS[:2]],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not the repo: the model's own copy of the code is what runs
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = champion["model"].predict({"question": QUESTIONS[:2]}, params={"max_new_tokens": 6})
    assert proc.stdout.strip().splitlines()[-1] == repr(expected["answer"].tolist())
