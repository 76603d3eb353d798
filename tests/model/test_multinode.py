"""Training across nodes: two torchrun elastic agents on loopback, each started by `qa-lora train` as a
node would start it (its own working directory, HOME and temp directory), sharing only the run directory,
meeting at a c10d rendezvous.

A run completes with world size 2 and global rank 0 alone writing; a worker killed mid-run is restarted
by the agents and the group resumes from the last complete checkpoint to the same step and adapter; a
node lost mid-run that never comes back ends the other node's task with one line naming the rendezvous
and the timeout, not a hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from small_lora import SMALL_LORA

from tasks.core.config import REPO_ROOT

pytestmark = pytest.mark.slow

QA_LORA = str(Path(sys.executable).with_name("qa-lora"))
STEPS, SAVE = 60, 10  # enough steps after the first checkpoint to lose a node mid-run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_dir(root: Path, tiny_base: Path, **train: Any) -> tuple[Path, Path]:
    """A run directory with the split and a params overlay: 2 nodes of 1 process, global batch 8."""
    rows = [json.loads(line) for line in (REPO_ROOT / "data" / "qa.jsonl").read_text().splitlines()][:160]
    data = root / "run" / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:128]))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[128:]))
    params = root / "params.yaml"
    doc = {
        "extends": str(REPO_ROOT / "params.yaml"),
        "base": {"name_or_path": str(tiny_base), "kind": "hub"},
        "lora": {**SMALL_LORA, "dropout": 0.0},
        "train": {
            "max_steps": STEPS, "save_steps": SAVE, "save_total_limit": 10, "logging_steps": 10,
            "per_device_train_batch_size": 4, "max_length": 128, "learning_rate": 0.003, "warmup_ratio": 0.0,
            "precision": "fp32", "nnodes": 2, "num_processes": 1, "max_restarts": 3, "replay_ratio": 0.0, **train,
        },
        "eval": {"max_rows": 16},
        "runtime": {"num_threads": 1},
        "register": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
    }  # fmt: skip
    params.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return root / "run", params


def _node(root: Path, name: str, run_dir: Path, params: Path, port: int) -> subprocess.Popen[bytes]:
    """`qa-lora train` as node `name` runs it: a home, working and temp directory of its own."""
    home = root / name
    (home / "tmp").mkdir(parents=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "QA_LORA_ROOT": str(REPO_ROOT),
        "QA_LORA_CACHE_DIR": str(home / "cache"),
    }
    command = [QA_LORA, "train", "--params", str(params), "--run-dir", str(run_dir)]
    command += ["--set", f"train.rdzv_endpoint=127.0.0.1:{port}"]
    with (home / "node.log").open("wb") as log:
        return subprocess.Popen(
            command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _two_nodes(root: Path, run_dir: Path, params: Path) -> list[subprocess.Popen[bytes]]:
    """Node 0 first: its agent hosts the c10d rendezvous store (the node at `train.rdzv_endpoint`), as the
    pod with index 0 does on Kubernetes; node 1 joins once node 0's torchrun is up."""
    port = _free_port()
    first = _node(root, "node0", run_dir, params, port)
    deadline = time.monotonic() + 120
    while "launching" not in _log(root, "node0"):
        assert time.monotonic() < deadline and first.poll() is None, _log(root, "node0")[-3000:]
        time.sleep(0.2)
    time.sleep(2)  # its agent binds the rendezvous port
    return [first, _node(root, "node1", run_dir, params, port)]


def _kill_node(node: subprocess.Popen[bytes]) -> None:
    """SIGKILL a node's stage and torchrun agent, as when its machine or pod is lost; its worker (in a
    session of its own) must go with its agent, not linger waiting on its peers."""
    import psutil

    processes = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    workers = _workers(processes)
    for process in processes:
        if process not in workers:
            process.kill()
    node.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"worker {alive} outlived its agent"


def _first_checkpoint(run_dir: Path, nodes: list[subprocess.Popen[bytes]], root: Path) -> None:
    checkpoint = run_dir / "train" / "checkpoints" / f"checkpoint-{SAVE}"
    deadline = time.monotonic() + 300
    while not (checkpoint / "trainer_state.json").is_file():
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), _log(root, "node0")[
            -3000:
        ]
        time.sleep(0.05)


def _finish(*nodes: subprocess.Popen[bytes], timeout: float = 600) -> list[int]:
    try:
        return [node.wait(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)


def _log(root: Path, name: str) -> str:
    return (root / name / "node.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def uninterrupted(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("two-nodes")
    run_dir, params = _run_dir(root, tiny_base)
    codes = _finish(*_two_nodes(root, run_dir, params))
    assert codes == [0, 0], _log(root, "node0")[-3000:] + _log(root, "node1")[-3000:]
    return {
        "root": root,
        "run_dir": run_dir,
        "summary": json.loads((run_dir / "train" / "train_summary.json").read_text()),
    }


def test_two_nodes_train_with_world_size_two_and_rank_0_alone_writes(uninterrupted: dict[str, Any]) -> None:
    summary, root = uninterrupted["summary"], uninterrupted["root"]
    assert (summary["nodes"], summary["processes"], summary["global_batch_size"]) == (2, 2, 8)
    assert summary["steps"] == STEPS and summary["worker_restarts"] == 0
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    # Both nodes' stages end with the same result (the other node waits for rank 0's summary)...
    results = [json.loads(_log(root, n)[_log(root, n).rindex('{\n  "status"') :]) for n in ("node0", "node1")]
    assert results[0]["steps"] == results[1]["steps"] == STEPS
    assert results[0]["mlflow_run_id"] == results[1]["mlflow_run_id"]  # one training, one MLflow run
    # ... and each node's scratch (torchrun's own files) stayed on that node; the shared directory holds
    # only the run's outputs.
    for name in ("node0", "node1"):
        assert {p.name for p in (root / name).iterdir()} <= {"cache", "node.log", "tmp"}
        assert list((root / name / "tmp").glob("torchelastic_*"))
    shared = [p for p in (root / "run").rglob("*") if "torchelastic" in p.name or p.name.startswith("tmp")]
    assert not shared
    adapter = {p.name for p in (root / "run" / "train" / "adapter").iterdir()} >= PEFT_ADAPTER_FILES
    assert adapter


PEFT_ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "chat_format.json"}


def _workers(processes: list[Any]) -> list[Any]:
    """The training worker among a node's processes (not its torchrun agent): exactly one per node here."""
    workers = [
        p
        for p in processes
        if "tasks.runners.launch" in (c := " ".join(p.cmdline())) and "torch.distributed.run" not in c
    ]
    assert len(workers) == 1
    return workers


def _kill_worker(node: subprocess.Popen[bytes]) -> None:
    """SIGKILL only the training worker of a node: its agent lives on and sees it die."""
    import psutil

    _workers(psutil.Process(node.pid).children(recursive=True))[0].kill()


def test_a_lost_worker_is_restarted_and_resumes_from_the_last_checkpoint(
    uninterrupted: dict[str, Any], tiny_base: Path, tmp_path: Path
) -> None:
    """Node 1's worker is killed mid-run: both agents restart the worker group, which resumes from the last
    complete checkpoint on the shared directory and ends at the same step with the same adapter as the
    uninterrupted run (same data order, RNG states from the checkpoint, no dropout)."""
    from safetensors.torch import load_file

    run_dir, params = _run_dir(tmp_path, tiny_base)
    nodes = _two_nodes(tmp_path, run_dir, params)
    _first_checkpoint(run_dir, nodes, tmp_path)
    _kill_worker(nodes[1])
    codes = _finish(*nodes)
    logs = _log(tmp_path, "node0") + _log(tmp_path, "node1")
    assert codes == [0, 0], logs[-6000:]
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    # resumed, not started over (rank 0's agent restarted on the membership change, which torch does not
    # count in TORCHELASTIC_RESTART_COUNT: `worker_restarts` is node 1's affair)
    assert summary["steps"] == STEPS and SAVE <= summary["resumed_from_step"] < STEPS
    assert "resuming from" in logs and "checkpoint-" in logs.split("resuming from", 1)[1][:300]
    reference = uninterrupted["summary"]
    assert summary["eval_loss_after"] == pytest.approx(reference["eval_loss_after"], rel=1e-3)
    ours = load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors")
    theirs = load_file(uninterrupted["run_dir"] / "train" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-3


def test_a_node_that_never_comes_back_ends_the_task_in_one_line(tiny_base: Path, tmp_path: Path) -> None:
    """Node 1 is lost mid-run (every process killed) and not replaced: node 0's worker fails, its agent
    restarts the worker group and waits at the rendezvous for train.rdzv_timeout_s, then the task ends
    with one line naming the rendezvous and the timeout."""
    run_dir, params = _run_dir(tmp_path, tiny_base, rdzv_timeout_s=20)
    nodes = _two_nodes(tmp_path, run_dir, params)
    _first_checkpoint(run_dir, nodes, tmp_path)
    _kill_node(nodes[1])
    started = time.monotonic()
    code = _finish(nodes[0], timeout=300)[0]
    log = _log(tmp_path, "node0")
    port = yaml.safe_load((run_dir / "train" / "checkpoints" / "launch_params.yaml").read_text())["train"][
        "rdzv_endpoint"
    ]
    assert code == 2, log[-4000:]
    assert (
        f"qa-lora: error: training on 2 nodes stopped: the rendezvous at {port} did not gather every node "
        "within train.rdzv_timeout_s=20 s"
    ) in log
    assert "Traceback" not in log.split("qa-lora: error:")[-1]
    assert time.monotonic() - started < 200  # the timeout ends it, not a hang
