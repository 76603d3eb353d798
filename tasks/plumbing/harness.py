"""lm-evaluation-harness, the standard engine for standard tasks, run on the models evaluate loads.

`eval.harness_tasks` names tasks the harness knows (arc_easy, hellaswag, mmlu_*: their datasets come from
the hub, or the local datasets cache when offline), paths to task YAMLs of your own, and `qa_lora_mc`:
a multiple-choice task built here from the run's eval rows (the right answer among three answers to
other questions), so the engine runs on the embedded default with nothing to download.

The models are the ones the evaluate stage scores (`stages/evaluate/scoring.load_model`: same device,
dtype and merged adapter), handed to the harness's HF model as objects. Its `peft=` path is not used: it
calls `tie_weights()` after loading an adapter, which fails on a base with tied embeddings whose adapter
saves them (`KeyError: "attribute 'weight' already exists"`, the embedded recipe).

The harness is the optional extra `harness` (`pip install '.[harness]'`; `make setup` installs it). A
missing extra, an unknown task or an unreachable dataset is one line naming the task, never a skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.config import Config
from tasks.core.errors import UserError

log = logging.getLogger("qa_lora.evaluate")

LOCAL_TASK = "qa_lora_mc"
LOCAL_TASK_VERSION = "1"  # bump when the local task's documents or YAML change: cached results are stale
DISTRACTORS = 3
_TASK_FILES = (".yaml", ".yml", ".py", ".json", ".jsonl", ".csv", ".parquet", ".txt")
# The metric gated per task, first found: the harness's usual headline metrics (higher is better).
PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mcc")

_LOCAL_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def harness_settings(cfg: Config) -> dict[str, Any] | None:
    """What decides the harness's results besides the model (the eval cache keys on it), checked: None
    when `eval.harness_tasks` is empty.

    Raises:
        UserError: the extra is not installed, or a task YAML path does not exist.
    """
    names = list(cfg.eval.harness_tasks)
    if not names:
        return None
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(
            f"eval.harness_tasks {names}: lm-evaluation-harness is not installed; install the extra "
            "(pip install -c constraints.txt '.[harness]', which `make setup` does) or set "
            "eval.harness_tasks: []"
        )
    yamls = {}
    for name in names:
        if _is_yaml(name):
            path = cfg.resolve(name)
            if not path.is_file():
                raise UserError(f"eval.harness_tasks: {path}: no such task YAML")
            yamls[name] = _folder_digest(path.parent)
    return {
        "tasks": names,
        "yamls": yamls,
        "local_task": LOCAL_TASK_VERSION,
        "limit": cfg.eval.harness_limit,
        "lm_eval": importlib.metadata.version("lm_eval"),
    }


def _folder_digest(folder: Path) -> str:
    """A task YAML's folder, which the harness indexes (its YAMLs, `include:`d parents, `!function`
    modules and local data files): its files' content decides the task."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _TASK_FILES):
        digest.update(f"{path.relative_to(folder)}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def local_task_docs(rows: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """The `qa_lora_mc` documents: per eval row its question, its answer among DISTRACTORS answers of
    other questions (picked and ordered by a hash of the row's id: the same rows give the same task)."""
    answers = sorted({r["answer"] for r in rows})
    docs = []
    for row in rows:

        def order(text: str, row_id: str = row["id"]) -> str:
            return hashlib.sha256(f"{row_id}\n{text}".encode()).hexdigest()

        others = sorted((a for a in answers if a != row["answer"]), key=order)[:DISTRACTORS]
        choices = sorted([row["answer"], *others], key=order)
        docs.append({"id": row["id"], "question": row["question"], "choices": choices})
        docs[-1]["label"] = choices.index(row["answer"])
    return docs


def check_tasks(cfg: Config, rows: Sequence[Mapping[str, str]]) -> None:
    """Load every task of `eval.harness_tasks` (its dataset included) before any model is scored, so an
    unknown task or an unreachable dataset stops evaluate in seconds rather than after the base's scoring.

    Raises:
        UserError: as :func:`harness_scores`.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qa-lora-harness-") as scratch:
        names, _ = _load_tasks(cfg, rows, Path(scratch))
    log.info("harness tasks %s: loaded", names)


def harness_scores(
    model: Any, tokenizer: Any, cfg: Config, rows: Sequence[Mapping[str, str]], workdir: Path
) -> dict[str, dict[str, Any]]:
    """Run `eval.harness_tasks` on a loaded model.

    Args:
        model: a transformers causal LM in eval mode (an adapter merged in), on its device.
        tokenizer: its tokenizer.
        rows: the eval rows (`qa_lora_mc` is built from them).
        workdir: where the local task's YAML and documents are written (a scratch directory).

    Returns:
        Per requested task or group (a group on its aggregate, not per subtask): {"metric", "value",
        "stderr", "metrics": its finite numeric results}; "metric" and "value" are None when the harness
        gave no higher-is-better metric for it.

    Raises:
        UserError: an unknown task, or a dataset that cannot be loaded (offline, no such dataset).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names, manager = _load_tasks(cfg, rows, workdir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the harness's per-request progress bars, not in task logs
    out = lm_eval.simple_evaluate(  # errors from here on are not the task list's: they propagate
        model=lm,
        tasks=names,
        task_manager=manager,
        limit=cfg.eval.harness_limit,
        log_samples=False,
        bootstrap_iters=cfg.eval.bootstrap_samples,
        random_seed=cfg.eval.seed,
    )
    results, better = (out or {}).get("results", {}), (out or {}).get("higher_is_better", {})
    return {name: _headline(results.get(name) or {}, better.get(name) or {}) for name in names}


def _load_tasks(cfg: Config, rows: Sequence[Mapping[str, str]], workdir: Path) -> tuple[list[str], Any]:
    """The task names and a TaskManager that finds them, every task loaded once (a user's task list
    fails here, in one line)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    names, include = _task_names(cfg, rows, workdir)
    manager = TaskManager(include_path=include or None)
    with _one_line_errors(names):
        get_task_dict(names, manager)  # simple_evaluate loads them again: the datasets from the cache
    return names, manager


@contextlib.contextmanager
def _one_line_errors(names: Sequence[str]) -> Iterator[None]:
    """The harness's errors for a task it cannot run, as one line naming the task list."""
    try:
        yield
    except KeyError as exc:  # the harness's "is not a registered task/group/tag name or valid YAML path"
        raise UserError(f"eval.harness_tasks: {exc.args[0] if exc.args else exc}") from None
    except (ConnectionError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"eval.harness_tasks {list(names)}: a task or its dataset could not be loaded "
            f"({type(exc).__name__}: {first}); offline, a standard task needs its dataset in the local "
            "datasets cache (HF_DATASETS_CACHE)"
        ) from None


def _task_names(cfg: Config, rows: Sequence[Mapping[str, str]], workdir: Path) -> tuple[list[str], list[str]]:
    """The names the harness runs and the folders it reads task YAMLs from (the local task written)."""
    names: list[str] = []
    include: list[str] = []
    for entry in cfg.eval.harness_tasks:
        if entry == LOCAL_TASK:
            include.append(str(_write_local_task(rows, workdir)))
            names.append(LOCAL_TASK)
        elif _is_yaml(entry):
            path = cfg.resolve(entry)
            include.append(str(path.parent))
            names.append(_yaml_task_name(path))
        else:
            names.append(entry)
    return names, list(dict.fromkeys(include))


def _write_local_task(rows: Sequence[Mapping[str, str]], workdir: Path) -> Path:
    folder = workdir / LOCAL_TASK
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{LOCAL_TASK}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in local_task_docs(rows)), "utf-8")
    (folder / f"{LOCAL_TASK}.yaml").write_text(_LOCAL_YAML.format(name=LOCAL_TASK, data=data), "utf-8")
    return folder


def _yaml_task_name(path: Path) -> str:
    """The `task:` a user's YAML declares (the harness runs tasks by name)."""
    import yaml

    try:
        name = (yaml.safe_load(path.read_text("utf-8")) or {}).get("task")
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"eval.harness_tasks: {path}: not a readable task YAML ({exc})") from None
    if not isinstance(name, str) or not name:
        raise UserError(f"eval.harness_tasks: {path}: the YAML has no `task:` name")
    return name


def _is_yaml(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))


def _headline(values: Mapping[str, Any], higher_is_better: Mapping[str, Any]) -> dict[str, Any]:
    """One task's results: its finite numeric values by metric name (the first filter's, e.g. `none` or
    `strict-match`), and the gated metric: a preferred one, else the first the harness says is higher-is-
    better (none: the rule fails for the task rather than gating on a metric whose sign it does not know)."""
    metrics: dict[str, float] = {}
    for key, value in values.items():
        if (
            "," in key
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        ):
            metrics.setdefault(key.split(",", 1)[0], float(value))
    main = next((m for m in PREFERRED_METRICS if m in metrics), None)
    main = main or next((m for m in metrics if higher_is_better.get(m) is True), None)
    return {
        "metric": main,
        "value": metrics.get(main) if main else None,
        "stderr": metrics.get(f"{main}_stderr") if main else None,
        "metrics": metrics,
    }
