"""Multi-process training through torchrun (torch.distributed.run), the engine accelerate itself uses.

`train.num_processes > 1` makes tasks/train.py call :func:`launch_training`, which saves the effective
config into the run directory and starts `python -m torch.distributed.run --nproc_per_node N -m
tasks.runners.launch ...`. Each process runs the same training function; the Trainer (accelerate underneath)
sets up DDP (gloo on CPU, NCCL/RCCL on GPUs) or FSDP from the environment torchrun provides. Rank 0
writes the outputs. No home-made process management: torchrun starts, watches and stops the workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tasks.core.config import PACKAGE_ROOT, REPO_ROOT, Config, save_config
from tasks.core.errors import UserError

log = logging.getLogger("qa_lora.train")


def launch_training(cfg: Config, run_dir: Path) -> None:
    """Run the training in `train.num_processes` processes and wait for them.

    Raises:
        RuntimeError: a worker process failed (its traceback is in the log above).
    """
    run_dir = Path(run_dir).resolve()
    n = cfg.train.num_processes
    params = save_config(cfg, run_dir / "train" / "checkpoints" / "launch_params.yaml")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env["QA_LORA_ROOT"] = str(REPO_ROOT)  # the workers work on the same project as this process
    if cfg.runtime.device == "cpu" or not _has_gpu():
        # N processes share the cores: more threads than cores each would thrash.
        threads = cfg.runtime.num_threads or max(1, (os.cpu_count() or 1) // n)
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one node, a free rendezvous port picked by torchrun
        f"--nproc_per_node={n}",
        "-m",
        "tasks.runners.launch",
        "--params",
        str(params),
        "--run-dir",
        str(run_dir),
    ]
    log.info("launching %d training processes (%s): %s", n, cfg.train.distributed, " ".join(cmd))
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=False)
    if done.returncode == 2:
        raise UserError(f"training processes refused the params (exit 2); see the log above ({params})")
    if done.returncode != 0:
        raise RuntimeError(f"training processes failed with exit code {done.returncode}; see the log above")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one worker process (started by torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m tasks.runners.launch")
    parser.add_argument("--params", required=True)
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)

    from tasks.core.config import load_config
    from tasks.core.logs import setup_logging
    from tasks.stages.train.stage import _train_process

    try:
        cfg = load_config(args.params)
        setup_logging(cfg.runtime.log_level)
        _train_process(cfg, Path(args.run_dir))
    except UserError as exc:
        print(f"qa-lora: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
