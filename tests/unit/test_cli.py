"""The `qa-lora` CLI: user errors are one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.runners.cli import STAGES, build_parser, main


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.runners.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_help_lists_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in [*STAGES, "run", "base", "info", "promote", "rollback"]:
        assert name in out


def test_stage_help_shows_common_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--params" in out and "--set" in out and "--run-dir" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bogus"], "invalid choice: 'bogus'"),
        ([], "the following arguments are required: COMMAND"),
        (["train", "--nope"], "unrecognized arguments: --nope"),
        (["train", "--set", "train.learning_rate=-1"], "train.learning_rate: input should be greater than 0"),
        (["train", "--set", "lora.rank=8"], "unknown key 'lora.rank'"),
        (["train", "--set", "novalue"], "expected section.key=value"),
        (
            ["train", "--params", "/nonexistent/params.yaml"],
            "/nonexistent/params.yaml: params file not found",
        ),
    ],
)
def test_user_errors_exit_2_with_one_line(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.startswith("qa-lora: error: ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_user_error_has_no_traceback() -> None:
    proc = _run("train", "--set", "runtime.device=tpu")
    assert proc.returncode == 2
    assert "runtime.device: input should be 'auto', 'cpu' or 'cuda'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def torch_backend() -> str:
    """What this machine offers, read from torch directly (not through tasks.plumbing.device)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "rocm" if getattr(torch.version, "hip", None) else "cuda"


def test_info_reports_device_and_plan() -> None:
    proc = _run("info", "--set", "runtime.device=cpu")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["capabilities"]["backend"] == "cpu"  # forced, whatever the machine has
    assert report["capabilities"]["torch_version"].startswith("2.")
    assert report["plan"]["device"] == "cpu"
    assert report["plan"]["precision"] in ("fp32", "bf16")
    assert report["plan"]["reasons"]
    assert report["training"] == {
        "processes_per_node": 1, "nodes": 1, "world_size": 1, "distributed": None, "launcher": "in process",
        "rendezvous": None, "max_restarts": 0,
    }  # fmt: skip


def test_info_shows_the_distributed_setting_it_would_use() -> None:
    proc = _run(
        "info", "--set", "runtime.device=cpu", "--set", "train.num_processes=8", "--set", "train.nnodes=4",
        "--set", "train.distributed=fsdp", "--set", "train.rdzv_endpoint=qa-train-0.qa-train:29400",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    training = json.loads(proc.stdout)["training"]
    assert (training["world_size"], training["distributed"], training["launcher"]) == (32, "fsdp", "torchrun")
    assert training["rendezvous"] == "qa-train-0.qa-train:29400"


def test_auto_device_is_what_torch_sees(torch_backend: str) -> None:
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["capabilities"]["backend"] == torch_backend
    assert report["plan"]["device"] == ("cpu" if torch_backend == "cpu" else "cuda")
    assert bool(report["capabilities"]["gpu_names"]) == (torch_backend != "cpu")


def test_cuda_requested_is_honoured_with_a_gpu_and_a_user_error_without(torch_backend: str) -> None:
    proc = _run("info", "--set", "runtime.device=cuda")
    if torch_backend == "cpu":
        assert proc.returncode == 2
        assert "runtime.device: 'cuda' was requested but torch sees no GPU" in proc.stderr
        assert "Traceback" not in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["capabilities"]["backend"] == torch_backend and report["plan"]["device"] == "cuda"


def test_parser_is_the_documented_interface() -> None:
    args = build_parser().parse_args(["train", "--set", "a.b=1", "--set", "c.d=2", "--run-dir", "x"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.run_dir == "x"
