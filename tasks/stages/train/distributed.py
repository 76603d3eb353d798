"""Multi-process training through torchrun (torch.distributed.run), the engine accelerate itself uses.

`train.num_processes > 1`: the stage saves the effective config beside the checkpoints and starts
`python -m torch.distributed.run --standalone --nproc_per_node N -m tasks.runners.launch ...`. Each
worker runs the same training process (process.train_process); the Trainer (accelerate underneath) sets
up DDP (gloo on CPU, NCCL/RCCL on GPUs) or FSDP from the environment torchrun provides. Rank 0 writes
the outputs. No home-made process management: torchrun starts, watches and stops the workers.

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
    """Run the training in `train.num_processes` processes and wait for them.

    Raises:
        UserError: the workers refused the params (exit code 2).
        RuntimeError: a worker process failed (its traceback is in the log above).
    """
    n = cfg.train.num_processes
    params = save_config(cfg, layout.checkpoints_dir / "launch_params.yaml")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one node, a free rendezvous port picked by torchrun
        f"--nproc_per_node={n}",
        "-m",
        WORKER_MODULE,
        "--params",
        str(params),
        "--run-dir",
        str(layout.root),
    ]
    log.info("launching %d training processes (%s): %s", n, cfg.train.distributed, " ".join(cmd))
    preexec = die_with_parent if sys.platform == "linux" else None
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=_worker_env(cfg), check=False, preexec_fn=preexec)
    if done.returncode == 2:
        raise UserError(f"training processes refused the params (exit 2); see the log above ({params})")
    if done.returncode != 0:
        raise RuntimeError(f"training processes failed with exit code {done.returncode}; see the log above")


def _worker_env(cfg: Config) -> dict[str, str]:
    """This process's environment, with this checkout importable and CPU threads split between workers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env["QA_LORA_ROOT"] = str(REPO_ROOT)  # the workers work on the same project as this process
    if cfg.runtime.device == "cpu" or not _has_gpu():
        # N processes share the cores: more threads than cores each would thrash.
        n = cfg.train.num_processes
        env["OMP_NUM_THREADS"] = str(cfg.runtime.num_threads or max(1, (os.cpu_count() or 1) // n))
    return env


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
