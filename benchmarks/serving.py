"""Figure 8: `mlflow models serve` on our python_function model vs MLflow's transformers flavor.

The same merged weights served two ways, each by `mlflow models serve --env-manager local -w 1` on a
loopback port: ours (the registered MLflow Model: ONNX Runtime with the KV cache, no torch) and the
merged model logged with `mlflow.transformers` as a text-generation pipeline (PyTorch `generate`).
Each request carries one question, as a Q&A client sends it; C client threads send the requests (C = 1
and 8) and the figure is requests/s over the whole batch of requests and the p95 of their latencies.
Both are greedy with the same `max_new_tokens`; the transformers side is sent the templated prompt
(its pipeline knows no template) and its answers are compared with ours, text for text. The two
servers take turns (side, concurrency, repeat) so drifting load hits both alike; the median repeat is
reported.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata as md
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import loadavg, median, ratio
from benchmarks.inference import export_run

CONCURRENCY = (1, 8)
START_TIMEOUT_S = 300


def run(tmp: Path, quick: bool, run_dir: Path | None = None) -> dict[str, Any]:
    """Serve the exported run both ways and time them; answers compared for every question."""
    from tasks.plumbing.chat import ChatFrame

    run_dir, exported, _ = export_run(tmp, run_dir)
    chat = ChatFrame.load(Path(exported["onnx_dir"]))
    bos = chat.material["special_tokens"]["bos_token"][0] or ""  # the pipeline's tokenizer adds BOS itself
    rows = [json.loads(line) for line in (run_dir / "data" / "eval.jsonl").read_text().splitlines()]
    requests = 16 if quick else 48
    questions = [r["question"] for r in rows[:requests]]
    max_new = 32
    repeats = 1 if quick else 3
    ours_dir = _save_ours(tmp / "serve-ours", Path(exported["onnx_dir"]))
    hf_dir = _save_transformers(tmp / "serve-hf", Path(exported["merged_dir"]), max_new)

    def ask_ours(port: int, q: str) -> str:
        body = {"dataframe_split": {"columns": ["question"], "data": [[q]]}}
        return _post(port, {**body, "params": {"max_new_tokens": max_new}})["predictions"][0]["answer"]

    def ask_hf(port: int, q: str) -> str:
        return _post(port, {"inputs": [chat.prompt(q).removeprefix(bos)]})["predictions"][0]

    sides: dict[str, Callable[[int, str], str]] = {"pyfunc_onnx": ask_ours, "transformers": ask_hf}
    out: dict[str, Any] = {"requests": len(questions), "max_new_tokens": max_new, "repeats": repeats}
    with _served(ours_dir, tmp / "ours.log") as p_ours, _served(hf_dir, tmp / "hf.log") as p_hf:
        ports = {"pyfunc_onnx": p_ours, "transformers": p_hf}
        answers = {side: [ask(ports[side], q) for q in questions] for side, ask in sides.items()}
        timings: dict[str, dict[int, list[dict[str, float]]]] = {
            s: {c: [] for c in CONCURRENCY} for s in sides
        }
        for _ in range(repeats):
            for c in CONCURRENCY:
                for side, ask in sides.items():
                    timings[side][c].append(_load_test(lambda q, a=ask, s=side: a(ports[s], q), questions, c))
    same = [
        a.strip() == b.strip() for a, b in zip(answers["pyfunc_onnx"], answers["transformers"], strict=True)
    ]
    out["identical_answers"] = sum(same) / len(same)
    out["example"] = {"question": questions[0], "pyfunc_onnx": answers["pyfunc_onnx"][0]}
    for c in CONCURRENCY:
        fig: dict[str, Any] = {}
        for side in sides:
            runs = timings[side][c]
            fig[side] = {
                "requests_per_s": median([r["requests_per_s"] for r in runs]),
                "p95_latency_s": median([r["p95_latency_s"] for r in runs]),
                "runs_requests_per_s": [round(r["requests_per_s"], 2) for r in runs],
            }
        fig["ours_vs_transformers"] = ratio(
            fig["pyfunc_onnx"]["requests_per_s"], fig["transformers"]["requests_per_s"]
        )
        out[f"concurrency{c}"] = fig
    out["load_after"] = loadavg()
    return out


def _save_ours(path: Path, onnx_dir: Path) -> Path:
    """The MLflow Model the register stage uploads (the same function writes it), self-contained here."""
    from tasks.plumbing.serving import save_pyfunc_model

    return save_pyfunc_model(path, onnx_dir, copy_onnx=True)


def _save_transformers(path: Path, merged_dir: Path, max_new: int) -> Path:
    """The merged model as MLflow's transformers flavor: a greedy text-generation pipeline, new text only."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    config = {"max_new_tokens": max_new, "do_sample": False, "return_full_text": False}
    # Pinned here: MLflow's default requirements for a text pipeline name torchvision (not installed).
    pins = [f"{name}=={md.version(name)}" for name in ("transformers", "torch", "tokenizers")]
    mlflow.transformers.save_model(generator, str(path), model_config=config, pip_requirements=pins)
    return path


def _load_test(ask: Callable[[str], str], questions: list[str], concurrency: int) -> dict[str, float]:
    """Send every question once from `concurrency` client threads; requests/s and p95 latency."""

    def timed(q: str) -> float:
        t = time.perf_counter()
        ask(q)
        return time.perf_counter() - t

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = sorted(pool.map(timed, questions))
    wall = time.perf_counter() - t0
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    return {"requests_per_s": len(questions) / wall, "p95_latency_s": p95}


def _post(port: int, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


@contextmanager
def _served(model_dir: Path, log: Path) -> Iterator[int]:
    """`mlflow models serve` for `model_dir` on a free loopback port, one worker; stopped by its group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    bin_dir = Path(sys.executable).parent  # `--env-manager local` runs uvicorn by name: PATH needs it
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(proc, port, log)
        yield port
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"mlflow models serve not ready after {START_TIMEOUT_S}s: {log.read_text()[-2000:]}")
