"""What serving an ONNX export costs, measured the way it is served: in a fresh process that loads the
model (:class:`Answerer`, the python_function flavor's predictor) and answers questions.

Figures (one process per measurement, so the peak RSS is that of a server holding this model):
* `tokens_per_s_b1`: new tokens (up to and including EOS) per second, one question per request;
* `tokens_per_s_b8`: the same with eight questions per request;
* `latency_p50_ms`, `latency_p95_ms`: per request at batch 1 (they depend on answer lengths too);
* `size_bytes`: the export directory on disk (graph, weights, tokenizer, variants; not the model card);
* `peak_rss_bytes`: the process's peak resident memory after loading and answering;
* `load_s`: from the import of onnxruntime to a model ready to answer.

`python -m tasks.plumbing.serving.cost SPEC.json` runs one measurement and prints it as JSON (the
spec: onnx_dir, questions, max_new_tokens, provider).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.core.config import PACKAGE_ROOT
from tasks.core.errors import UserError

BATCH = 8
TIMEOUT_S = 900


def measure_in_fresh_process(
    onnx_dir: Path, questions: Sequence[str], max_new_tokens: int, provider: str
) -> dict[str, Any]:
    """One measurement of `onnx_dir` in a new Python process (see the module docstring for the figures).

    Raises:
        UserError: the process failed (its last line of output is in the message).
    """
    spec = {
        "onnx_dir": str(onnx_dir),
        "questions": list(questions),
        "max_new_tokens": max_new_tokens,
        "provider": provider,
    }
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="qa-lora-serving-") as f:
        json.dump(spec, f)
        f.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "tasks.plumbing.serving.cost", f.name],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
            timeout=TIMEOUT_S,
        )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{onnx_dir}: measuring the served model failed (exit {proc.returncode}): {last}")
    return json.loads(lines[-1])


def measure(onnx_dir: Path, questions: Sequence[str], max_new_tokens: int, provider: str) -> dict[str, Any]:
    """The figures for `onnx_dir`, measured in this process (call it in a fresh one)."""
    import numpy as np

    from tasks.plumbing.serving.predictor import Answerer

    t = time.perf_counter()
    generator = Answerer(onnx_dir, provider=provider).generator
    load_s = time.perf_counter() - t
    prompts = [generator.chat.prompt(q) for q in questions]
    generator.generate(prompts[:1], max_new_tokens=max_new_tokens)  # warm-up: first-call set-up
    latencies, tokens_b1 = [], 0
    for prompt in prompts:
        t = time.perf_counter()
        out = generator.generate([prompt], max_new_tokens=max_new_tokens)
        latencies.append(time.perf_counter() - t)
        tokens_b1 += sum(map(len, out.token_ids))
    t, tokens_b8 = time.perf_counter(), 0
    for i in range(0, len(prompts), BATCH):
        tokens_b8 += sum(map(len, generator.generate(prompts[i : i + BATCH], max_new_tokens).token_ids))
    seconds_b8 = time.perf_counter() - t
    p50, p95 = np.percentile(latencies, [50, 95])  # linear between the closest ranks
    return {
        "tokens_per_s_b1": round(tokens_b1 / sum(latencies), 1),
        "tokens_per_s_b8": round(tokens_b8 / seconds_b8, 1),
        "latency_p50_ms": round(1000 * float(p50), 2),
        "latency_p95_ms": round(1000 * float(p95), 2),
        "size_bytes": served_bytes(Path(onnx_dir)),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_s": round(load_s, 3),
        "requests": len(prompts),
        "new_tokens_b1": tokens_b1,
        "provider": generator.provider,
    }


def served_bytes(onnx_dir: Path) -> int:
    """Bytes of every file a server loads from `onnx_dir` (all but the model card, README.md)."""
    return sum(p.stat().st_size for p in onnx_dir.rglob("*") if p.is_file() and p.name != "README.md")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m tasks.plumbing.serving.cost SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    figures = measure(
        Path(spec["onnx_dir"]), spec["questions"], int(spec["max_new_tokens"]), spec["provider"]
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
