"""The AMD install path, for real: `pip install -e '.[rocm]'` (and '.[migraphx]') in a throwaway venv.

Each extra gets a fresh venv in which pip must end with exactly one `onnxruntime*` distribution and a clean
`pip check`, and in which the project's ONNX Runtime greedy generation, run on the AMD build, gives the
CPU build's tokens (and logits) on the tiny model's export. On this CPU-only machine the AMD provider
cannot load: asking for it must stop with one line naming the provider and the missing library, and
`allow_cpu_fallback` must run and say so. On a machine where it does load, its tokens must match too.

Cheap by construction (about a minute per extra here): the venv is `python -m venv --without-pip` plus
hard links to this venv's installed packages minus every ONNX Runtime and the project itself (no copy,
no download of torch or Airflow), then pip installs the project with the extra under constraints.txt:
only the runtime wheel is fetched (pip's cache keeps it), and the project is built without build
isolation. `pip check` then judges the whole set: had any installed package required the CPU
`onnxruntime`, it would report it missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# extra -> (distribution, provider)
AMD_EXTRAS = {
    "rocm": ("onnxruntime-rocm", "ROCMExecutionProvider"),
    "migraphx": ("onnxruntime-migraphx", "MIGraphXExecutionProvider"),
}
PROMPTS = ["What does len() return?", "How do you open a file for reading and close it afterwards?"]
NEW_TOKENS = 12
# Left out of the clone: what the throwaway venv must install itself.
_NOT_CLONED = ("onnxruntime", "qa_lora", "__editable__.qa_lora", "__editable___qa_lora")

# Runs inside the throwaway venv: the project's generator on the AMD build, three ways.
_GENERATE = r"""
import json, sys
from tasks.core.errors import UserError
from tasks.plumbing.onnx_generate import load_onnx_generator
from tasks.plumbing.ort_runtime import describe_runtime

onnx_dir, new_tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
out = {"runtime": describe_runtime()}
cpu_gen = load_onnx_generator(onnx_dir, provider="CPU")
prompts = [cpu_gen.chat.prompt(q) for q in prompts]
cpu = cpu_gen.generate(prompts, new_tokens, return_logits=True)
out["cpu"] = {"tokens": cpu.token_ids, "prefill": cpu.prefill_logits.tolist()}
try:
    gen = load_onnx_generator(onnx_dir)
    out["auto"] = {"provider": gen.provider, "tokens": gen.generate(prompts, new_tokens).token_ids}
except UserError as exc:
    out["auto"] = {"error": str(exc), "type": type(exc).__name__}
fallback = load_onnx_generator(onnx_dir, allow_cpu_fallback=True)
out["fallback"] = {"note": fallback.fallback, "tokens": fallback.generate(prompts, new_tokens).token_ids}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def tiny_onnx(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny base exported by the export stage's graph exporter, and its greedy output on the CPU build.

    The runtime is under test here, not the merge: the base alone is exported (no adapter).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.core.config import load_config
    from tasks.plumbing.chat import chat_format
    from tasks.plumbing.loading import load_tokenizer
    from tasks.plumbing.onnx_generate import load_onnx_generator
    from tasks.stages.export import generation_config
    from tasks.stages.export.onnx_graph import export_onnx

    cfg = load_config(overrides=[f"base.name_or_path={tiny_base}"])
    chat = chat_format(cfg, load_tokenizer(cfg, padding_side="left"))
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    onnx_dir = tmp_path_factory.mktemp("tiny-onnx") / "onnx"
    gen_config = generation_config(cfg, chat.tokenizer, chat.stop_token_ids)
    export_onnx(model, chat, gen_config, onnx_dir, cfg.export.opset)
    cpu = load_onnx_generator(onnx_dir, provider="CPU")
    out = cpu.generate([chat.prompt(q) for q in PROMPTS], NEW_TOKENS, return_logits=True)
    assert all(out.token_ids), "the tiny model generated nothing: the comparison would be vacuous"
    return {"dir": onnx_dir, "tokens": out.token_ids, "prefill": out.prefill_logits}


def _clone_venv(dst: Path) -> Path:
    """A venv holding hard links to this venv's packages except every ONNX Runtime and the project."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dst)], check=True)
    python = dst / "bin" / "python"
    dst_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    src_site = Path(sysconfig.get_paths()["purelib"])
    entries = [str(p) for p in src_site.iterdir() if not p.name.startswith(_NOT_CLONED)]
    # Hard links: free and instant. pip and Python replace files (new inodes), never write into them,
    # so this venv's files stay untouched. Another filesystem: a plain copy (slower, same result).
    same_fs = src_site.stat().st_dev == dst_site.stat().st_dev
    subprocess.run(["cp", "-al" if same_fs else "-a", *entries, str(dst_site)], check=True)
    return python


def _pip(python: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [str(python), "-m", "pip", *args], cwd=REPO, env=env, capture_output=True, text=True, check=check
    )


@pytest.mark.parametrize("extra", sorted(AMD_EXTRAS))
def test_amd_extra_installs_one_runtime_that_generates_the_cpu_tokens(
    extra: str, tiny_onnx: dict[str, Any], tmp_path: Path
) -> None:
    import numpy as np

    dist, provider = AMD_EXTRAS[extra]
    python = _clone_venv(tmp_path / "venv")
    install = _pip(
        python,
        "install",
        "--quiet",
        "--no-build-isolation",
        "-c",
        "constraints.txt",
        "-e",
        f".[{extra}]",
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    check = _pip(python, "check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    listed = json.loads(_pip(python, "list", "--format", "json").stdout)
    runtimes = [p["name"].lower() for p in listed if p["name"].lower().startswith("onnxruntime")]
    assert runtimes == [dist], f"expected exactly one ONNX Runtime ({dist}), found {runtimes}"

    run = subprocess.run(
        [str(python), "-c", _GENERATE, str(tiny_onnx["dir"]), str(NEW_TOKENS), json.dumps(PROMPTS)],
        cwd=tmp_path,  # not the repo: `tasks` must come from the installed project
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    got = json.loads(lines[-1].removeprefix("RESULT "))

    assert got["runtime"]["distributions"][0].startswith(dist) and provider in got["runtime"]["providers"]
    assert got["runtime"]["auto_provider"] == provider
    # the AMD build on its CPU provider = the CPU build: same tokens, logits within float noise
    assert got["cpu"]["tokens"] == tiny_onnx["tokens"]
    assert np.abs(np.asarray(got["cpu"]["prefill"]) - tiny_onnx["prefill"]).max() < 1e-4
    if "error" in got["auto"]:  # no AMD GPU stack here: one line naming the provider and what is missing
        message = got["auto"]["error"]
        assert got["auto"]["type"] == "ProviderUnavailable" and "\n" not in message
        assert f"could not load {provider}" in message and "missing library: lib" in message
        assert provider in got["fallback"]["note"]
    else:  # a machine with a working AMD stack: the GPU provider loaded and must agree
        assert got["auto"]["provider"] == provider and got["auto"]["tokens"] == tiny_onnx["tokens"]
        assert got["fallback"]["note"] is None
    assert got["fallback"]["tokens"] == tiny_onnx["tokens"]
    shutil.rmtree(tmp_path / "venv", ignore_errors=True)
