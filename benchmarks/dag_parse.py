"""Figure 5: DAG parse time and the modules parsing imports, with airflow already imported.

Airflow's DAG processor imports airflow once and parses each DAG file in a forked child. The same
here: one fresh interpreter imports airflow (timed on its own), then forks one child per repeat;
each child parses dags/qa_lora_finetune.py with DagBag and reports its time, the top-level packages
that parsing imported, and whether torch (or another heavy library) was among them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import loadavg, median, run_python
from tasks.core.config import REPO_ROOT

HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "great_expectations", "mlflow", "dvc", "onnx")

_CHILD = r"""
import json, os, sys, time
t = time.perf_counter()
import airflow
from airflow.sdk import dag, task
from airflow.dag_processing.dagbag import DagBag
airflow_import_s = time.perf_counter() - t
import multiprocessing as mp

FILE, REPEATS, HEAVY = os.environ["BENCH_DAG_FILE"], int(os.environ["BENCH_REPEATS"]), json.loads(os.environ["BENCH_HEAVY"])
EMPTY = os.environ["BENCH_EMPTY_DIR"]

def parse(queue):
    t = time.perf_counter()
    DagBag(dag_folder=EMPTY)  # DagBag's own set-up, without any file
    empty_s = time.perf_counter() - t
    before = set(sys.modules)
    t = time.perf_counter()
    bag = DagBag(dag_folder=FILE)
    seconds = time.perf_counter() - t
    new = sorted(set(sys.modules) - before)
    tops = sorted({m.split(".")[0] for m in new})
    queue.put({
        "seconds": seconds,
        "empty_s": empty_s,
        "dags": sorted(bag.dags),
        "errors": {k: str(v)[:300] for k, v in bag.import_errors.items()},
        "new_modules": len(new),
        "new_top_level": tops,
        "heavy": [h for h in HEAVY if h in sys.modules],
    })

ctx = mp.get_context("fork")
runs = []
for _ in range(REPEATS):
    q = ctx.Queue()
    p = ctx.Process(target=parse, args=(q,))
    p.start()
    runs.append(q.get(timeout=300))
    p.join()
print(json.dumps({"airflow_import_s": airflow_import_s, "runs": runs}))
"""


def run(tmp: Path, quick: bool) -> dict[str, Any]:
    """Parse the DAG `repeats` times in forked children of an airflow-importing interpreter."""
    repeats = 3 if quick else 7
    dag_file = REPO_ROOT / "dags" / "qa_lora_finetune.py"
    env = {
        "AIRFLOW_HOME": str(tmp / "airflow-parse"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
    }
    empty = tmp / "empty-dags"
    empty.mkdir(parents=True, exist_ok=True)
    env.update(
        BENCH_DAG_FILE=str(dag_file),
        BENCH_REPEATS=str(repeats),
        BENCH_HEAVY=json.dumps(HEAVY),
        BENCH_EMPTY_DIR=str(empty),
    )
    load = loadavg()
    data = run_python(_CHILD, env=env, timeout=600)
    runs = data["runs"]
    first = runs[0]
    return {
        "dag_file": str(dag_file.relative_to(REPO_ROOT)),
        "parse_s_median": median([r["seconds"] for r in runs]),
        "parse_s_runs": [round(r["seconds"], 3) for r in runs],
        "empty_dagbag_s_median": median([r["empty_s"] for r in runs]),
        "file_s_median": median([r["seconds"] - r["empty_s"] for r in runs]),
        "airflow_import_s": round(data["airflow_import_s"], 2),
        "dags": first["dags"],
        "import_errors": first["errors"],
        "new_modules": first["new_modules"],
        "new_top_level_packages": first["new_top_level"],
        "heavy_imported": sorted({h for r in runs for h in r["heavy"]}),
        "repeats": repeats,
        "load": load,
        "method": "DagBag(dag_folder=<the DAG file>) in a forked child of a process that imported airflow",
    }
