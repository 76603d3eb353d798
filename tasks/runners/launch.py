"""The torchrun worker entry point: `python -m tasks.runners.launch --params P --run-dir D`.

The train stage starts `python -m torch.distributed.run ... -m tasks.runners.launch ...` for
`train.num_processes > 1` (tasks/stages/train/distributed.py names this module by path, so the stage
never imports a runner). Each worker loads the saved effective config and runs the stage's training
process; torchrun's environment (RANK, WORLD_SIZE, ...) tells it its place. Rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tasks.core.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker process (started by torchrun).

    Returns:
        0 on success; 2 when the params are refused (a UserError, printed on one line).
    """
    parser = argparse.ArgumentParser(prog="python -m tasks.runners.launch")
    parser.add_argument("--params", required=True)
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)

    if sys.platform == "linux":
        from tasks.stages.train.distributed import die_with_parent

        # torchrun starts workers in sessions of their own: an agent killed outright (SIGKILL, a lost
        # node) would leave this worker waiting on its peers for ever. It goes with its agent instead.
        die_with_parent()

    from tasks.core.config import load_config
    from tasks.core.logs import setup_logging
    from tasks.stages.train.process import train_process

    try:
        cfg = load_config(args.params)
        setup_logging(cfg.runtime.log_level)
        train_process(cfg, Path(args.run_dir))
    except UserError as exc:
        from tasks.core.redact import redact

        print(f"qa-lora: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
