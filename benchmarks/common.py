"""Shared pieces of the benchmarks: machine description, load, GEMM ceiling, a run dir with a split."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.core.config import REPO_ROOT, Config, load_config

BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
# No hub downloads anywhere (offline machine), quiet analytics of DVC/GX/MLflow.
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "False",
    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (other work on a shared machine skews every timing)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    mem = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem = round(pages * size / 2**30, 1)
    except (ValueError, OSError):
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_bf16": [f for f in ("avx512_bf16", "amx_bf16") if f in flags],
        "memory_gib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["hip"] = torch.version.hip
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "onnxruntime",
        "apache-airflow",
        "dvc",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `fn` per repeat, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def gemm_flops(device: str, dtype_name: str, sizes: Sequence[int], seconds: float = 1.0) -> dict[str, Any]:
    """torch.matmul FLOP/s on square n x n matrices (2 n^3 per product), best of short repeats.

    Each size runs ~`seconds` in 7 timed blocks. `flops` is the best block: the ceiling is what the
    machine can do, and other processes on a shared machine only ever slow a block down (small GEMMs
    measured 3 to 180 GFLOP/s here under load). The median is kept beside it.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out: dict[str, Any] = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)
        # calibrate by doubling, not from one call: a single call can stall for a timeslice when other
        # processes hold the cores (one 256^2 call estimated 15 ms here, where 1 ms is typical)
        reps = 1
        while True:
            sync()
            t = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b)
            sync()
            if time.perf_counter() - t >= seconds / 7 or reps >= 1 << 20:
                break
            reps *= 2
        rates = []
        for _ in range(7):
            sync()
            t = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b)
            sync()
            rates.append(2 * n**3 * reps / (time.perf_counter() - t))
        out[str(n)] = {"flops": max(rates), "median": median(rates), "min": min(rates), "reps": reps}
        del a, b
    return out


def bench_config(tmp: Path, overrides: Sequence[tuple[str, Any]] = ()) -> Config:
    """The repository's params with a throwaway registry, plus `overrides`."""
    return load_config(
        None,
        [
            ("register.tracking_uri", f"sqlite:///{tmp}/mlflow.db"),
            ("eval.cache_dir", None),
            ("runtime.run_dir", str(tmp / "runs" / "bench")),
            *overrides,
        ],
    )


def write_split(run_dir: Path, eval_every: int = 10, max_eval: int = 64) -> dict[str, int]:
    """run_dir/data/{train,eval}.jsonl straight from data/qa.jsonl (the validate stage is not timed here).

    Every `eval_every`-th row goes to eval (at most `max_eval`), the rest to train.
    """
    rows = [json.loads(line) for line in (REPO_ROOT / "data" / "qa.jsonl").read_text().splitlines() if line]
    train, evals = [], []
    for i, row in enumerate(rows):
        keep = {k: str(row.get(k, "")) for k in ("id", "question", "answer", "category")}
        (evals if i % eval_every == 0 and len(evals) < max_eval else train).append(keep)
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("eval", evals)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return {"train_rows": len(train), "eval_rows": len(evals)}


def run_python(code: str, env: dict[str, str] | None = None, timeout: int = 600) -> dict[str, Any]:
    """Run `code` in a fresh interpreter (repo root as cwd); it prints one JSON line last."""
    proc = subprocess.run(
        [PYTHON, "-c", code],
        cwd=REPO_ROOT,
        env={**os.environ, **QUIET_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"subprocess failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b
