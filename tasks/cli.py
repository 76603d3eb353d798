"""`qa-lora`: one subcommand per stage, plus `run`, `base` and `info`.

Each stage subcommand parses the config, calls one stage function and prints its small JSON result.
`dvc.yaml` calls these; the Airflow DAG calls the same functions directly. A user error (bad flag,
bad config, missing file, bad data) prints one line to stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.errors import UserError

log = logging.getLogger("qa_lora")

# subcommand -> (module, function, one-line help). Each function is `fn(cfg, run_dir) -> dict`.
STAGES: dict[str, tuple[str, str, str]] = {
    "validate": ("tasks.validate", "validate_dataset", "validate and split the Q&A dataset (GX)"),
    "version": ("tasks.version", "version_dataset", "snapshot the validated data in DVC and push it"),
    "train": ("tasks.train", "train_adapter", "LoRA SFT of the base model on the train split"),
    "evaluate": ("tasks.evaluate", "evaluate_candidate", "score base/candidate/champion; the gate"),
    "export": ("tasks.export", "export_model", "merge the adapter, export ONNX, check parity"),
    "register": ("tasks.register", "register_model", "register in MLflow; promote if the gate passed"),
}
EXTRA: dict[str, tuple[str, str, str]] = {
    "run": ("tasks.pipeline", "run_pipeline", "run every stage in order on this machine"),
    "base": ("tasks.base", "build_base_model", "build (or reuse) the embedded tiny base model"),
}


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
    info = sub.add_parser("info", help="device report: torch build, ROCm/CUDA/CPU, bf16, precision")
    _common(info)
    promote = sub.add_parser("promote", help="move the champion alias to VERSION (with who/why)")
    _common(promote)
    promote.add_argument("version", help="registered model version number")
    promote.add_argument("--reason", default="manual promotion", help="recorded in the version's tags")
    rollback = sub.add_parser("rollback", help="move the champion alias back to the previous one")
    _common(rollback)
    rollback.add_argument("--reason", default="manual rollback", help="recorded in the version's tags")
    return parser


def setup_logging(level: str = "INFO") -> None:
    """Timestamped progress lines on stderr (what an Airflow task log shows)."""
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # Libraries whose INFO lines drown the pipeline's own progress in task logs.
    for noisy in (
        "great_expectations",
        "alembic",
        "httpx",
        "urllib3",
        "filelock",
        "mlflow",
        "dvc",
        "asyncio",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def resolve_stage(name: str) -> Callable[..., dict[str, Any]]:
    """Import a stage function by subcommand name; heavy imports happen only here."""
    module_name, func_name, _ = {**STAGES, **EXTRA}[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            from tasks.errors import NotBuiltYet

            raise NotBuiltYet(f"stage {name!r} is not built yet ({module_name} does not exist)") from None
        raise
    return getattr(module, func_name)


def _dispatch(args: argparse.Namespace) -> Any:
    from tasks.config import load_config

    cfg = load_config(args.params, args.overrides)
    setup_logging(cfg.runtime.log_level)
    run_dir = Path(args.run_dir) if args.run_dir else cfg.resolve(cfg.runtime.run_dir)
    if args.command == "info":
        from tasks.device import describe_device

        return describe_device(cfg.runtime.device)
    if args.command in ("promote", "rollback"):
        from tasks import register

        who = os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"
        if args.command == "promote":
            return register.promote_version(cfg, args.version, reason=args.reason, actor=who)
        return register.rollback_champion(cfg, reason=args.reason, actor=who)
    if args.command == "base":
        return resolve_stage("base")(cfg)
    return resolve_stage(args.command)(cfg, run_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qa-lora` console script."""
    try:
        args = build_parser().parse_args(argv)
        result = _dispatch(args)
    except UserError as exc:
        print(f"qa-lora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qa-lora: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
