"""Figure 9: the pipeline at 10k, 100k and 1M rows: wall time, rows/s and peak RSS per stage.

Each size is a generated file of distinct Q&A rows (benchmarks/synthetic.py, ~330 bytes a row). Every
stage runs as `qa-lora <stage>` in its own process, as `dvc repro` runs them, so each has its own peak
RSS (ru_maxrss); train runs 5 steps (its cost that grows with the data is preparing it), and the gate
rules that a 5-step adapter on made-up words cannot pass are waived (this figure measures scale, not
quality). Beside validate, the floor on the same file in the same run: pyarrow's raw JSONL read and a
batch tokenization of its rendered rows; validate's rows/s is stated as a share of that floor.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import PYTHON, QUIET_ENV, loadavg, ratio
from benchmarks.synthetic import write_rows
from tasks.core.config import REPO_ROOT

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (5_000, 50_000)
STAGES = ("validate", "version", "train", "evaluate", "export", "register")

# Runs one `qa-lora` command in this process and prints its wall time and peak RSS as the last line.
_MEASURED = r"""
import contextlib, io, json, resource, sys, time
from tasks.runners.cli import main
t = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

# The floor: read the file with pyarrow, then render and tokenize every row in batches (nothing else),
# with the Rust tokenizer on every core as validation uses it.
_FLOOR = r"""
import json, sys, time
import pyarrow.json as pj
from tasks.core.config import load_config
from tasks.plumbing.chat import chat_format
from tasks.plumbing.loading import load_tokenizer
from tasks.stages.validate.facts import parallel_tokenizer
path, params = sys.argv[1], sys.argv[2]
t = time.perf_counter()
table = pj.read_json(path)
read_s = time.perf_counter() - t
cfg = load_config(params)
chat = chat_format(cfg, load_tokenizer(cfg))
t, tokens = time.perf_counter(), 0
with parallel_tokenizer():
    for batch in table.select(["question", "answer"]).to_batches(50_000):
        rows = batch.to_pylist()
        tokens += sum(map(len, chat.token_ids([chat.example(r)[0] for r in rows])))
print(json.dumps({"rows": table.num_rows, "read_s": read_s, "tokenize_s": time.perf_counter() - t, "tokens": tokens}))
"""


def run(tmp: Path, quick: bool) -> dict[str, Any]:
    """Every size: the floor, then each stage in its own process; the ratios across sizes."""
    sizes: dict[str, Any] = {}
    for rows in QUICK_SIZES if quick else SIZES:
        work = tmp / f"scale-{rows}"
        work.mkdir(parents=True, exist_ok=True)
        data = write_rows(work / "qa.jsonl", rows)
        params = _params(work, data)
        floor = _python(_FLOOR, [str(data), str(params)])
        stages = {name: _stage(name, params, work / "run") for name in STAGES}
        floor_rows_per_s = rows / (floor["read_s"] + floor["tokenize_s"])
        validate_rows_per_s = rows / stages["validate"]["seconds"]
        sizes[str(rows)] = {
            "rows": rows,
            "file_bytes": data.stat().st_size,
            "floor": {**floor, "rows_per_s": round(floor_rows_per_s)},
            "stages": stages,
            "validate_rows_per_s": round(validate_rows_per_s),
            "validate_vs_floor": ratio(validate_rows_per_s, floor_rows_per_s),
            "load": loadavg(),
        }
    small, large = sizes[min(sizes, key=int)], sizes[max(sizes, key=int)]
    return {
        "sizes": sizes,
        "largest_rows": large["rows"],
        "validate_seconds_largest": large["stages"]["validate"]["seconds"],
        "validate_peak_gib_largest": large["stages"]["validate"]["peak_rss"] / 2**30,
        # time ~linear in rows (ratio of per-row costs near 1), memory flat (peak ratio near 1)
        "validate_time_per_row_ratio": ratio(
            large["stages"]["validate"]["seconds"] / large["rows"],
            small["stages"]["validate"]["seconds"] / small["rows"],
        ),
        "peak_rss_ratio": {
            name: ratio(large["stages"][name]["peak_rss"], small["stages"][name]["peak_rss"])
            for name in STAGES
        },
        "validate_vs_floor_largest": large["validate_vs_floor"],
    }


def _params(work: Path, data: Path) -> Path:
    """A params overlay: the data file, a throwaway registry and remote, 5 training steps, small checks."""
    doc = {
        "extends": str(REPO_ROOT / "params.yaml"),
        "data": {"source": str(data), "allowed_roots": [str(work)], "dvc_remote": str(work / "remote")},
        "train": {"max_steps": 5, "save_steps": 5, "logging_steps": 1},
        "eval": {"max_rows": 50, "cache_dir": None},
        "gate": {
            "min_improvement": -1.0,
            "min_eos_rate": 0.0,
            "max_top_answer_share": 1.0,
            "max_empty_rate": 1.0,
        },
        "export": {"parity_prompts": 2, "parity_new_tokens": 8, "serving_prompts": 4, "serving_repeats": 1},
        "register": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "model_name": "scale"},
    }
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _stage(name: str, params: Path, run_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    out = _python(_MEASURED, [name, "--params", str(params), "--run-dir", str(run_dir)])
    if out["rc"] != 0:
        raise RuntimeError(f"qa-lora {name} exited {out['rc']}")
    return {
        "seconds": round(out["seconds"], 2),
        "process_seconds": round(time.perf_counter() - started, 2),  # with interpreter start-up
        "peak_rss": out["peak_rss"],
    }


def _python(code: str, args: list[str], timeout: int = 3600) -> dict[str, Any]:
    proc = subprocess.run(
        [PYTHON, "-c", code, *args],
        cwd=REPO_ROOT,
        env={**os.environ, **QUIET_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"subprocess failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1])
