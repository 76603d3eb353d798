"""Multi-process and multi-node training through torchrun (torch.distributed.run), the engine accelerate
itself uses.

`train.num_processes > 1` on one node: the stage saves the effective config beside the checkpoints and
starts `python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.runners.launch ...`.
`train.nnodes > 1`: the same stage runs on every node (a pod each, placed by Kubernetes), and each starts
torchrun's elastic agent with a c10d rendezvous (`--rdzv-backend c10d --rdzv-endpoint HOST:PORT`, the
endpoint from `train.rdzv_endpoint` or the scheduler's environment) and `--max-restarts`: when a worker
or a node fails, the agents restart the worker group, which resumes from the last complete checkpoint
on the shared run directory; a node that does not come back within `train.rdzv_timeout_s` ends the task
with one line naming the rendezvous. Each worker runs the same training process (process.train_process);
the Trainer (accelerate underneath) sets up DDP (gloo on CPU, NCCL/RCCL on GPUs) or FSDP2 from the
environment torchrun provides (on CPU, FSDP through trainer.shard_on_cpu). Global rank 0 writes the
outputs. No home-made process management: torchrun starts, watches, restarts and stops the workers.

The worker entry point is a runner (tasks/runners/launch.py). It is named here by module path only:
imports go runners -> stages, never back.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from tasks.core.config import PACKAGE_ROOT, REPO_ROOT, Config, save_config
from tasks.core.errors import UserError
from tasks.core.layout import RunLayout

log = logging.getLogger("qa_lora.train")

WORKER_MODULE = "tasks.runners.launch"  # `python -m` target of each torchrun worker
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """In a child between fork and exec: ask the kernel to SIGTERM it when its parent dies.

    An Airflow task killed with SIGKILL (a supervisor's escalation, the OOM killer) cannot tell torchrun
    to stop; torchrun then gets SIGTERM from the kernel and stops its workers, so nothing is orphaned.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def launch_processes(cfg: Config, layout: RunLayout) -> None:
    """Run this node's share of the training (`train.num_processes` workers) and wait for them.

    Raises:
        UserError: the workers refused the params (exit code 2), no rendezvous endpoint for several
            nodes, or the rendezvous timed out (a node that never came, or never came back).
        RuntimeError: a worker process failed (its traceback is in the log above).
    """
    params = save_config(cfg, layout.checkpoints_dir / "launch_params.yaml")
    cmd = torchrun_command(cfg, layout, params)
    log.info(
        "launching %d training processes (%s): %s",
        cfg.train.num_processes,
        cfg.train.distributed,
        " ".join(cmd),
    )
    preexec = die_with_parent if sys.platform == "linux" else None
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=_worker_env(cfg), stderr=subprocess.PIPE, text=True, preexec_fn=preexec
    )
    timed_out = _relay(proc)  # torchrun's log goes on to ours, line by line, as it comes
    code = proc.wait()
    if code == 2:
        raise UserError(f"training processes refused the params (exit 2); see the log above ({params})")
    if code != 0 and timed_out and cfg.train.nnodes > 1:
        raise UserError(
            f"training on {cfg.train.nnodes} nodes stopped: the rendezvous at {rendezvous_endpoint(cfg)} "
            f"did not gather every node within train.rdzv_timeout_s={cfg.train.rdzv_timeout_s} s (a node "
            "that never started, or never came back); see the log above"
        )
    if code != 0:
        raise RuntimeError(f"training processes failed with exit code {code}; see the log above")


def torchrun_command(cfg: Config, layout: RunLayout, params: Path) -> list[str]:
    """The torchrun command for this node: standalone on one node; c10d rendezvous across several."""
    t = cfg.train
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={t.num_processes}"]
    if t.nnodes == 1:
        cmd.append("--standalone")  # one node, a free rendezvous port picked by torchrun
    else:
        cmd += [
            f"--nnodes={t.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rendezvous_endpoint(cfg)}",
            f"--rdzv-id=qa-lora-{layout.root.name}",  # the same on every node of this run
            f"--rdzv-conf=join_timeout={t.rdzv_timeout_s},close_timeout={min(60, t.rdzv_timeout_s)}",
        ]
    cmd.append(f"--max-restarts={t.max_restarts}")
    return [*cmd, "-m", WORKER_MODULE, "--params", str(params), "--run-dir", str(layout.root)]


def rendezvous_endpoint(cfg: Config) -> str:
    """host:port of the c10d rendezvous: `train.rdzv_endpoint`, else what the scheduler set.

    Raises:
        UserError: several nodes and no endpoint anywhere.
    """
    if cfg.train.rdzv_endpoint:
        return cfg.train.rdzv_endpoint
    env = os.environ
    if env.get("PET_RDZV_ENDPOINT"):
        return env["PET_RDZV_ENDPOINT"]
    if env.get("MASTER_ADDR"):
        return f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29400')}"
    raise UserError(
        f"train.nnodes={cfg.train.nnodes}: no rendezvous endpoint; set train.rdzv_endpoint (host:port of "
        "node 0) or let the scheduler set PET_RDZV_ENDPOINT or MASTER_ADDR/MASTER_PORT"
    )


# What torchrun's agents say when the nodes cannot be gathered (again): the rendezvous timed out or closed,
# or its store is gone (the agents' handshake timed out).
_TIMEOUT_MARKERS = (
    "RendezvousTimeoutError",
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "DistStoreError",
)


def _relay(proc: subprocess.Popen[str]) -> bool:
    """Copy the launcher's stderr to ours; returns whether it reported a rendezvous timeout."""
    timed_out = False
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        timed_out = timed_out or any(marker in line for marker in _TIMEOUT_MARKERS)
    return timed_out


def _worker_env(cfg: Config) -> dict[str, str]:
    """This process's environment, with this checkout importable and CPU threads split between workers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env["QA_LORA_ROOT"] = str(REPO_ROOT)  # the workers work on the same project as this process
    if cfg.train.nnodes > 1:
        # A fresh worker store each rendezvous round: the store the agents share by default outlives a
        # restart with the dead workers' keys in it, and a new gloo worker can read its dead peer's address
        # and wait in init_process_group (torch issue #135712; the store is built once in
        # elastic/rendezvous/dynamic_rendezvous.py). Restarts hung in 3 of 5 trials with it shared.
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if cfg.runtime.device == "cpu" or not _has_gpu():
        # N processes share the node's cores: more threads than cores each would thrash.
        n = cfg.train.num_processes
        env["OMP_NUM_THREADS"] = str(cfg.runtime.num_threads or max(1, (os.cpu_count() or 1) // n))
    return env


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
