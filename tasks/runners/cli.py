"""`qa-lora`: one subcommand per stage, plus `run`, `base` and `info`.

Each stage subcommand parses the config, calls one stage function and prints its small JSON result.
`dvc.yaml` calls these; the Airflow DAG calls the same functions directly. A user error (bad flag,
bad config, missing file, bad data) prints one line to stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.core.errors import UserError
from tasks.core.logs import setup_logging
from tasks.core.redact import redact
from tasks.runners.pipeline import EXTRA, STAGES, resolve_stage, run_stage

log = logging.getLogger("qa_lora")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params",
        metavar="PATH",
        default=None,
        help="params file (default: params.yaml in the repository; presets in params/ extend it)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=[],
        help="override one value, typed like the file (repeatable), e.g. --set train.max_steps=20",
    )
    parser.add_argument(
        "--run-dir",
        metavar="DIR",
        default=None,
        help="where this run's artifacts go (default: runtime.run_dir from the params)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `qa-lora` argument parser."""
    parser = _Parser(
        prog="qa-lora",
        description="LoRA fine-tuning pipeline for Q&A models: "
        "validate -> version -> train -> evaluate -> export -> register.",
        epilog="Examples:\n  qa-lora run\n  qa-lora train --set train.max_steps=20\n"
        "  qa-lora info\n  qa-lora run --params params/llama2-7b-mi300x.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (_, _, help_text) in {**STAGES, **EXTRA}.items():
        _common(sub.add_parser(name, help=help_text, description=help_text))
    info = sub.add_parser(
        "info",
        help="device report: torch build, ROCm/CUDA/CPU, bf16, precision; with --params, the preset's "
        "parameters and memory per GPU on MI300X",
    )
    _common(info)
    promote = sub.add_parser("promote", help="move the champion alias to VERSION (with who/why)")
    _common(promote)
    promote.add_argument("version", help="registered model version number")
    promote.add_argument("--reason", default="manual promotion", help="recorded in the version's tags")
    rollback = sub.add_parser("rollback", help="move the champion alias back to the previous one")
    _common(rollback)
    rollback.add_argument("--reason", default="manual rollback", help="recorded in the version's tags")
    gc_help = (
        "retention: delete run directories beyond runtime.keep_runs / keep_gb, the registry versions "
        "registered from them and the DVC cache objects only they used (never an aliased version's run)"
    )
    gc = sub.add_parser("gc", help=gc_help, description=gc_help)
    _common(gc)
    gc.add_argument("--dry-run", action="store_true", help="list what would go and the bytes freed")
    registry = sub.add_parser("registry", help="`registry repair`: restore or finish a half-migrated store")
    _common(registry)
    registry.add_argument("action", choices=["repair"], help="restore the backup or finish the migration")
    return parser


def _dispatch(args: argparse.Namespace) -> Any:
    from tasks.core.config import load_config

    cfg = load_config(args.params, args.overrides)
    setup_logging(cfg.runtime.log_level)
    run_dir = Path(args.run_dir) if args.run_dir else cfg.resolve(cfg.runtime.run_dir)
    if args.command == "info":
        return _info(cfg, args.params)
    if args.command == "registry":
        from tasks.plumbing.tracking import repair_registry

        return repair_registry(cfg)
    if args.command in ("promote", "rollback"):
        from tasks.stages import register

        who = os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"
        if args.command == "promote":
            return register.promote_version(cfg, args.version, reason=args.reason, actor=who)
        return register.rollback_champion(cfg, reason=args.reason, actor=who)
    if args.command == "gc":
        from tasks.runners.retention import collect_garbage

        return collect_garbage(cfg, run_dir, dry_run=args.dry_run)
    if args.command == "base":
        return resolve_stage("base")(cfg)
    result = (
        run_stage(args.command, cfg, run_dir)
        if args.command in STAGES
        else resolve_stage(args.command)(cfg, run_dir)
    )
    # dvc.yaml's `metrics` are these flat per-stage numbers, not the stages' nested result files.
    from tasks.runners.dvc_metrics import write_stage_metrics

    write_stage_metrics(args.command, run_dir)
    return result


def _info(cfg: Any, params: Any = None) -> dict[str, Any]:
    """The device report, the precision and kernels verdicts measured on this machine, the ONNX
    Runtime build; with `--params`, what that preset's training takes on MI300X GPUs."""
    from tasks.plumbing.device import describe_device
    from tasks.plumbing.ort_runtime import describe_runtime
    from tasks.plumbing.verdicts import cached_verdicts
    from tasks.stages.train.probe import cache_file

    verdicts = {
        f"{setting}_verdicts": {"cache": str(cache), "measured": cached_verdicts(cache)}
        for setting in ("precision", "kernels")
        for cache in [cache_file(setting)]
    }
    # With a preset, this machine is reported as detected: a GPU preset is sized on a laptop too.
    here = describe_device("auto" if params is not None else cfg.runtime.device)
    report = {**here, **verdicts, "onnxruntime": describe_runtime(), "training": _distributed(cfg)}
    if params is not None:
        from tasks.stages.train.capacity import capacity_plan

        report["training_on_mi300x"] = {"params": str(params), **capacity_plan(cfg)}
    return report


def _distributed(cfg: Any) -> dict[str, Any]:
    """How the train stage would run: processes per node, nodes, world size, strategy, rendezvous."""
    t = cfg.train
    world = t.num_processes * t.nnodes
    rendezvous = "standalone (one node)"
    if t.nnodes > 1:
        rendezvous = t.rdzv_endpoint or "from the scheduler's environment (PET_RDZV_ENDPOINT, MASTER_ADDR)"
    return {
        "processes_per_node": t.num_processes,
        "nodes": t.nnodes,
        "world_size": world,
        "distributed": t.distributed if world > 1 else None,
        "launcher": "in process" if world == 1 else "torchrun",
        "rendezvous": rendezvous if world > 1 else None,
        "max_restarts": t.max_restarts,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qa-lora` console script."""
    try:
        args = build_parser().parse_args(argv)
        result = _dispatch(args)
    except UserError as exc:
        print(f"qa-lora: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qa-lora: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
