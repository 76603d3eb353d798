"""Run the benchmarks: `python -m benchmarks.run [--quick] [--only NAME ...] [--device cpu|cuda]`.

Figures (every one a ratio measured in this run; see benchmarks/RESULTS.md):
  training   1. train-stage tokens/s vs a naive TRL-defaults port and a bare PyTorch+PEFT loop;
             2. MFU vs the fp32 GEMM FLOP/s measured here
  inference  3. ONNX Runtime generation (KV cache) vs PyTorch eager generate, batch 1 and 8
  serving    8. `mlflow models serve`: our pyfunc (ONNX Runtime) vs the transformers flavor, requests/s
  dag        5. DAG parse time and imported modules (airflow already imported)
  memory     6. peak RSS of train and merge vs the model's bytes
  airflow    4a. `airflow dags test` wall vs the sum of its stages' own times (expensive)
  dvc        4b. `dvc repro` with nothing changed (expensive)
  gpu        7. LoRA tokens/s and MFU on a >= 1B Llama in bf16 (only with --device cuda)
  scale      9. every stage at 10k, 100k and 1M rows: wall, rows/s, peak RSS; validate vs its floor
  distributed 10. LoRA tokens/s over 1 and 2 processes and 2 nodes (loopback), DDP's communication share,
             bytes per rank with FSDP2 vs DDP, the 7B/70B presets' per-GPU plans (meta device)

Writes benchmarks/results.json (merged per figure, so `--only` updates one figure) and the table in
benchmarks/RESULTS.md between its markers. The GPU figure is measured on a GPU node
(`--device cuda`) and brought back with `--import-from THAT/results.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_DIR, QUIET_ENV, loadavg, machine

RESULTS_JSON = BENCH_DIR / "results.json"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
CPU_FIGURES = ("training", "inference", "serving", "dag", "memory", "airflow", "dvc", "scale", "distributed")
ALL = (*CPU_FIGURES, "gpu")
START, END = "<!-- results:start -->", "<!-- results:end -->"

log = logging.getLogger("qa_lora.bench")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.import_from is not None:
        return _import(args.import_from, args.only or ["gpu"], args.kind)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("qa_lora.train", "qa_lora.export", "qa_lora.evaluate", "httpx", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.update({k: v for k, v in QUIET_ENV.items() if k not in os.environ})

    figures = list(args.only or (("gpu",) if args.device == "cuda" else CPU_FIGURES))
    tmp = Path(tempfile.mkdtemp(prefix="qa-lora-bench-"))
    started = time.perf_counter()
    results = _load_previous()
    results["machine"] = machine()
    results["run"] = {
        "quick": args.quick,
        "device": args.device,
        "figures": figures,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_start": loadavg(),
    }
    results.setdefault("figures", {})
    try:
        _measure(figures, tmp, args, results)
    finally:
        results["run"]["seconds"] = round(time.perf_counter() - started, 1)
        results["run"]["load_end"] = loadavg()
        _write(results)
        if args.keep:
            log.info("work directory kept: %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("done in %.0fs: %s, %s", time.perf_counter() - started, RESULTS_JSON, RESULTS_MD)
    return 0 if all(results["figures"][n]["status"] != "failed" for n in figures) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (development)")
    parser.add_argument("--only", action="append", choices=ALL, help="run only this figure (repeatable)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: figure 7 (GPU)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument(
        "--import-from",
        metavar="RESULTS_JSON",
        type=Path,
        help="copy the figures named by --only (default: gpu) from a results.json written on another "
        "machine (a GPU node) into this one, and rewrite the table; runs nothing",
    )
    parser.add_argument(
        "--as",
        dest="kind",
        metavar="KIND",
        help="with --import-from: keep the figures as another CPU kind's (e.g. avx2, amx) beside this "
        "machine's own, as extra table rows for figures 1b and 3",
    )
    return parser


def _measure(figures: list[str], tmp: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Each figure in turn, written to results.json as it finishes; one that fails loses no other."""
    train_run_dir: Path | None = None
    for name in figures:
        log.info("benchmark %s: starting (load %s)", name, loadavg())
        t = time.perf_counter()
        try:
            data = _run_figure(name, tmp, args, train_run_dir)
            if name == "training":
                train_run_dir = Path(data["run_dir"])
            data["status"] = "measured"
        except Exception as exc:  # one broken figure must not lose the others
            if type(exc).__name__ == "NotMeasured":
                log.warning("benchmark %s: not measured: %s", name, exc)
                results["figures"][name] = {"status": "not measured", "reason": str(exc)}
                continue
            log.error("benchmark %s failed: %s", name, exc)
            data = {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-4000:],
            }
        data["seconds"] = round(time.perf_counter() - t, 1)
        data["load_end"] = loadavg()
        data["quick"] = args.quick
        results["figures"][name] = data
        log.info("benchmark %s: %s in %.0fs", name, data["status"], data["seconds"])
        _write(results)


def _run_figure(name: str, tmp: Path, args: argparse.Namespace, train_run_dir: Path | None) -> dict[str, Any]:
    if name == "training":
        from benchmarks import training

        return training.run(tmp, args.quick)
    if name == "inference":
        from benchmarks import inference

        return inference.run(tmp, args.quick, train_run_dir)
    if name == "serving":
        from benchmarks import serving

        return serving.run(tmp, args.quick, train_run_dir)
    if name == "dag":
        from benchmarks import dag_parse

        return dag_parse.run(tmp, args.quick)
    if name == "memory":
        from benchmarks import memory

        return memory.run(tmp, args.quick)
    if name == "airflow":
        from benchmarks import orchestration

        return orchestration.run_airflow(tmp, args.quick)
    if name == "dvc":
        from benchmarks import orchestration

        return orchestration.run_dvc(tmp, args.quick)
    if name == "scale":
        from benchmarks import scale

        return scale.run(tmp, args.quick)
    if name == "distributed":
        from benchmarks import distributed

        return distributed.run(tmp / "distributed", args.quick)
    if name == "gpu":
        from benchmarks import gpu

        return gpu.run(tmp, args.quick, args.device)
    raise ValueError(name)


def _import(path: Path, figures: list[str], kind: str | None = None) -> int:
    """Merge figures measured elsewhere; each keeps the machine it was measured on (`machine`).

    With `kind`, a figure is stored as `NAME@KIND` beside this machine's `NAME` instead of replacing it.
    """
    try:
        other = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {path}: cannot read a results.json ({exc})", file=sys.stderr)
        return 2
    results = _load_previous()
    results.setdefault("figures", {})
    for name in figures:
        data = (other.get("figures") or {}).get(name)
        if not data:
            print(f"error: {path}: no figure {name!r} in it", file=sys.stderr)
            return 2
        data.setdefault("machine", other.get("machine"))
        data.setdefault("started", (other.get("run") or {}).get("started"))
        key = f"{name}@{kind}" if kind else name
        results["figures"][key] = data
        print(f"imported figure {name} ({data.get('status')}) from {path} as {key}")
    _write(results)
    return 0


def _load_previous() -> dict[str, Any]:
    try:
        return json.loads(RESULTS_JSON.read_text())
    except (OSError, ValueError):
        return {}


def _write(results: dict[str, Any]) -> None:
    from benchmarks.report import render_table

    tmp = RESULTS_JSON.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(RESULTS_JSON)
    table = render_table(results)
    text = RESULTS_MD.read_text() if RESULTS_MD.is_file() else f"# Benchmark results\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    RESULTS_MD.write_text(f"{head}{START}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    raise SystemExit(main())
