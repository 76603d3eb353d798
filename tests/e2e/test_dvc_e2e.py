"""`dvc repro` end to end in a fresh git checkout, as a user reads it.

The checkout is a copy of this working tree committed into a new git repository (what a user's clone is),
with params.yaml shrunk for speed and pointed at a temporary registry and DVC remote. The tiny base is
copied in as `make demo` leaves it (built, not yet known to DVC). The tests share that checkout and run in
file order: a full repro (which must reuse the base), a no-op repro, readable metrics tables, the plots
page drawn offline in headless Chromium, a code edit seen by `dvc status`, an experiment, and last a
changed base recipe (which must rebuild the base).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WIDTH = 200
ALL_STAGES = {"base", "plots_template", "validate", "version", "train", "evaluate", "export", "register"}
METRICS = {
    "runs/dvc/metrics/data.json": {"rows_in", "rows_out"},
    "runs/dvc/metrics/train.json": {"loss", "eval_loss", "tok_s", "steps"},
    "runs/dvc/metrics/eval.json": {"token_f1", "base", "ci_low", "gate"},
    "runs/dvc/metrics/export.json": {"parity", "size_mb"},
}
OPTIONAL = {
    "champ",
    "unique",
    "p50_ms",
    "harness",
    "forget",
}  # reported when the run has them (a champion, a latency...)
# The README's comparison table: key params and the experiment's metrics (data counts and the champion
# are the same for every experiment of a sweep).
EXP_SHOW = [
    "dvc",
    "exp",
    "show",
    "--no-pager",
    "--drop",
    ".*[./]|gx$|Created$|State$|Executor$|rows_|dropped$|champ$",
]
EXP_KEEP = ["--keep", r"lora\.r$|train\.learning_rate$|train\.max_steps$"]
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def _sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 1500) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory, repo_root: Path, tiny_base: Path) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("dvc-e2e")
    repo = work / "repo"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=repo_root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        src = repo_root / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    shutil.copytree(tiny_base, repo / "models" / "tiny-base")  # what `make demo` leaves behind

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(max_steps=20, save_steps=20, logging_steps=5, replay_ratio=0.0)
    params["eval"].update(max_rows=24, max_new_tokens=12, bootstrap_samples=100, cache_dir=None)
    # Gating has its own tests: here every candidate passes, so export and register always run.
    params["gate"].update(min_improvement=-1.0, max_regression=1.0, min_slice_size=1000)
    params["gate"].update(min_eos_rate=0.0, max_empty_rate=1.0, max_top_answer_share=1.0)
    params["gate"].update(max_latency_regression=10.0, max_size_regression=10.0)  # serving rules too
    params["gate"]["max_general_ppl_increase"] = None  # and forgetting
    params["export"].update(parity_prompts=2, parity_new_tokens=4)
    params["register"]["tracking_uri"] = f"sqlite:///{work}/mlflow.db"
    params["data"]["dvc_remote"] = str(work / "remote")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # qa-lora, dvc, python
    env.pop("QA_LORA_ROOT", None)
    _sh(["git", "init", "-q", "-b", "main"], repo, env)
    _sh([*GIT, "add", "-A"], repo, env)
    _sh([*GIT, "commit", "-qm", "fresh clone"], repo, env)
    return repo, env


def _weights(repo: Path) -> tuple[int, int]:
    st = (repo / "models" / "tiny-base" / "model.safetensors").stat()
    return st.st_ino, st.st_mtime_ns


def test_repro_reuses_the_built_base_runs_everything_then_nothing(checkout) -> None:
    repo, env = checkout
    before = _weights(repo)
    first = _sh(["dvc", "repro"], repo, env)
    assert _ran(first) == ALL_STAGES
    # The base stage ran (DVC did not know it) but found `make demo`'s build: not deleted, not rebuilt.
    assert re.search(r'"built": false', first), first[-3000:]
    assert _weights(repo) == before
    assert (repo / "runs" / "dvc" / "register" / "registration.json").is_file()
    # Each `qa-lora <stage>` process reported its run to OpenLineage, all under the run directory's id.
    events = [json.loads(line) for line in (repo / "runs" / "lineage.jsonl").read_text().splitlines()]
    complete = {e["job"]["name"]: e for e in events if e["eventType"] == "COMPLETE"}
    assert set(complete) == ALL_STAGES - {"base", "plots_template"}, sorted(complete)
    assert len({e["run"]["facets"]["parent"]["run"]["runId"] for e in events}) == 1

    second = _sh(["dvc", "repro"], repo, env)
    assert _ran(second) == set()
    assert "up to date" in second.lower()
    _sh([*GIT, "add", "-A"], repo, env)
    _sh([*GIT, "commit", "-qm", "first repro"], repo, env)


def test_metrics_show_is_a_few_flat_numbers_that_fit(checkout) -> None:
    repo, env = checkout
    shown = json.loads(_sh(["dvc", "metrics", "show", "--json"], repo, env))
    files = shown[""]["data"]
    got = {path: set(entry["data"]) for path, entry in files.items()}
    assert set(got) == set(METRICS)
    for path, keys in got.items():
        assert METRICS[path] <= keys <= METRICS[path] | OPTIONAL, (path, keys)
        assert all(isinstance(v, int | float) for v in files[path]["data"].values()), files[path]
    assert files["runs/dvc/metrics/eval.json"]["data"]["gate"] == 1

    table = _sh(["dvc", "metrics", "show"], repo, env)
    assert max(map(len, table.splitlines())) <= WIDTH, table


def test_plots_page_draws_offline(checkout, tmp_path: Path) -> None:
    repo, env = checkout
    _sh(["dvc", "plots", "show"], repo, env)
    page = repo / "dvc_plots" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=", html), "the page must not load scripts from anywhere"
    assert html.count("vegaEmbed('#") == 2  # loss curve, token_f1 per model
    images = re.findall(r'<img[^>]+src="([^"]+)"', html[html.index("<body>") :])
    assert len(images) == 1 and (page.parent / images[0]).is_file()  # eval/comparison.png

    dom = _render_offline(page, tmp_path)
    charts = re.findall(r'<svg[^>]*class="marks"', dom)
    assert len(charts) == 2, dom[:2000]
    # Drawn, not blank: a loss line through several points, and bars (base, candidate) with a width.
    assert re.search(r'class="mark-line role-mark[^"]*"[^>]*>\s*<path[^>]+d="M[\d.,]+L[\d.,]+L', dom), dom[
        :3000
    ]
    bars = re.findall(r'aria-roledescription="bar" d="M[\d.]+,[\d.]+h([\d.]+)', dom)
    assert len(bars) >= 2 and max(map(float, bars)) > 0, bars


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    message = "headless Chromium is needed to check the plots page (Debian: apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _render_offline(page: Path, profile: Path) -> str:
    """The page's DOM after Chromium ran its scripts, with no network (own namespace when allowed)."""
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=127.0.0.1:9",
        "--virtual-time-budget=20000",
        "--dump-dom",
        page.as_uri(),
    ]
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        cmd = ["unshare", "-n", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_editing_a_train_helper_changes_train_and_what_follows_only(checkout) -> None:
    repo, env = checkout
    helper = sorted((repo / "tasks" / "stages" / "train").glob("*.py"))[-1]
    original = helper.read_text(encoding="utf-8")
    helper.write_text(original + "\n# edited\n", encoding="utf-8")
    try:
        # Only train's deps changed; what follows reruns only if train's outputs then change (a comment
        # leaves the adapter bit-identical, so DVC stops there: the experiment below reruns all of it).
        status = json.loads(_sh(["dvc", "status", "--json"], repo, env))
        assert set(status) == {"train"}, status
        assert _ran(_sh(["dvc", "repro", "--dry"], repo, env)) == {"train"}
    finally:
        helper.write_text(original, encoding="utf-8")
    assert json.loads(_sh(["dvc", "status", "--json"], repo, env)) == {}


def test_an_experiment_reruns_train_onwards_and_exp_show_fits(checkout) -> None:
    repo, env = checkout
    out = _sh(["dvc", "exp", "run", "-S", "train.learning_rate=0.003", "-n", "lr-3e-3"], repo, env)
    assert _ran(out) == {"train", "evaluate", "export", "register"}

    named = _find_named(json.loads(_sh(["dvc", "exp", "show", "--json"], repo, env)), "lr-3e-3")
    metrics = {k for entry in named["data"]["metrics"].values() for k in entry["data"]}
    assert set().union(*METRICS.values()) <= metrics <= set().union(*METRICS.values(), OPTIONAL)
    assert named["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.003

    wide_env = {**env, "COLUMNS": "1000"}  # rich sizes the table to its content below this
    table = _sh([*EXP_SHOW, *EXP_KEEP, "--sort-by", "token_f1", "--sort-order", "desc"], repo, wide_env)
    lines = [line.rstrip() for line in table.splitlines() if line.strip()]
    header = lines[1]
    for column in [
        "lora.r",
        "train.learning_rate",
        "token_f1",
        "loss",
        "eval_loss",
        "tok_s",
        "gate",
        "parity",
    ]:
        assert re.search(rf"(^|\s){re.escape(column)}(\s|$)", header), header
    assert "lr-3e-3" in table
    assert max(map(len, lines)) <= WIDTH, table


def test_a_queued_sweep_runs_one_training_at_a_time_and_ranks(checkout) -> None:
    """The README's sweep: queue a grid up to the gate, run it with one worker, rank it by the primary
    metric; nothing of the sweep is exported or registered."""
    repo, env = checkout
    versions_before = _model_versions(repo)
    assert versions_before >= 1  # the runs before registered models
    _sh(["dvc", "exp", "run", "--queue", "-S", "lora.r=4,16", "evaluate"], repo, env)
    _sh(["dvc", "queue", "start", "-j", "1"], repo, env)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            status = _sh(["dvc", "queue", "status"], repo, env)
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            time.sleep(5)
        assert status.count("Success") >= 2 and "Failed" not in status, status
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=env, capture_output=True, timeout=300)
    swept = {}  # lora.r -> (token_f1, experiment name)
    for exp in _experiments(json.loads(_sh(["dvc", "exp", "show", "--json"], repo, env))):
        r = exp["data"]["params"]["params.yaml"]["data"]["lora"]["r"]
        f1 = exp["data"]["metrics"].get("runs/dvc/metrics/eval.json", {}).get("data", {}).get("token_f1")
        if r in (4, 16) and f1 is not None:
            swept[r] = (f1, exp.get("name") or exp["data"].get("name"))
    assert set(swept) == {4, 16}, swept
    wide_env = {**env, "COLUMNS": "1000"}
    table = _sh([*EXP_SHOW, *EXP_KEEP, "--sort-by", "token_f1", "--sort-order", "desc"], repo, wide_env)
    ranked = sorted(swept.values(), reverse=True)
    names = [name for _, name in ranked]
    assert all(name and name in table for name in names), (names, table)
    assert ranked[0][0] == ranked[1][0] or table.index(names[0]) < table.index(names[1]), table
    assert _model_versions(repo) == versions_before  # the sweep stopped at the gate
    for name in names:  # the data stages came cached with each grid point's workspace: not rerun
        assert _ran(_sh(["dvc", "queue", "logs", name], repo, env)) == {"train", "evaluate"}, name

    # The winner into the workspace: its training and evaluation come with it (cached outputs), so
    # `dvc repro` only exports and registers it.
    _sh(["dvc", "exp", "apply", names[0]], repo, env)
    assert _ran(_sh(["dvc", "repro", "--dry"], repo, env)) == {"export", "register"}


def _model_versions(repo: Path) -> int:
    """Model versions in the checkout's registry (its params point at work/mlflow.db), read through
    MLflow's client like the other e2e tests, not its database schema."""
    import mlflow

    uri = f"sqlite:///{repo.parent}/mlflow.db"  # both: an earlier test may have left the global registry URI
    return len(mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions())


def _experiments(obj: object) -> list[dict]:
    """Every entry of `dvc exp show --json` with params (the workspace, the baseline, experiments)."""
    found: list[dict] = []
    if isinstance(obj, dict):
        if isinstance(obj.get("data"), dict) and "params" in obj["data"]:
            found.append(obj)
        obj = list(obj.values())
    for item in obj if isinstance(obj, list) else []:
        found += _experiments(item)
    return found


def _find_named(obj: object, name: str) -> dict:
    """The experiment called `name` anywhere in `dvc exp show --json`'s nesting."""
    if isinstance(obj, dict):
        if obj.get("name") == name and isinstance(obj.get("data"), dict):
            return obj
        obj = list(obj.values())
    for item in obj if isinstance(obj, list) else []:
        try:
            return _find_named(item, name)
        except LookupError:
            continue
    raise LookupError(name)


def test_a_changed_base_recipe_rebuilds_the_base(checkout) -> None:
    repo, env = checkout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["base"]["tiny"]["pretrain_steps"] = 3  # a small, different recipe: cheap to build
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = _weights(repo)
    assert "base" in json.loads(_sh(["dvc", "status", "--json"], repo, env))
    out = _sh(["dvc", "repro", "--single-item", "base"], repo, env)
    assert _ran(out) == {"base"}
    assert re.search(r'"built": true', out), out[-3000:]
    assert _weights(repo) != before
