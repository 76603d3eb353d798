"""Figure 10 (#38 item 5): training across processes and nodes, and what FSDP saves per rank.

Report-only on a CPU (gloo): each process gets one core here, so "2 processes vs 1" measures how the
step splits across cores plus what the gradient all-reduce costs, not a GPU node's scaling.

  10a. tokens/s of LoRA steps on a random ~100M-parameter Llama: 1 process, 2 processes on one node
       (`torchrun --standalone`), and 2 nodes of 1 process (two torchrun agents on loopback with a c10d
       rendezvous, as `train.nnodes: 2` starts them), all at the same global batch; and the share of a
       DDP step spent in communication: 1 - (step time under `no_sync()`, no all-reduce) / (with it);
  10b. bytes held per rank (parameters, gradients, optimizer state) with DDP vs FSDP2 (`fully_shard` per
       decoder layer: the base's frozen weights are sharded too), each rank's peak RSS, and beside them
       the 7B and 70B presets' per-GPU memory plans from the meta device (`qa-lora info --params`,
       tasks/stages/train/capacity.py), the 70B one also with DDP.

The measuring worker is this module run under torchrun (`python -m benchmarks.distributed --worker`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PYTHON, QUIET_ENV
from tasks.core.config import REPO_ROOT

# ~100M parameters: big enough that sharding the frozen base shows in bytes per rank
MODEL = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
}
SEQ = 128


def run(tmp: Path, quick: bool) -> dict[str, Any]:
    """Every sub-figure; the workers' own reports under `tmp`."""
    steps, batch = (4, 4) if quick else (12, 8)
    single = _launch(tmp / "single", "ddp", steps, batch, nodes=1, procs=1)
    one_node = _launch(tmp / "one-node", "ddp", steps, batch, nodes=1, procs=2)
    two_nodes = _launch(tmp / "two-nodes", "ddp", steps, batch, nodes=2, procs=1)
    fsdp = _launch(tmp / "fsdp", "fsdp", steps, batch, nodes=1, procs=2)
    return {
        "model_params": one_node["params_total"],
        "trainable_params": one_node["params_trainable"],
        "global_batch": batch,
        "seq": SEQ,
        "steps": steps,
        "tokens_per_s": {
            "1 process": single["tokens_per_s"],
            "2 processes, 1 node": one_node["tokens_per_s"],
            "2 nodes x 1 process": two_nodes["tokens_per_s"],
        },
        "two_procs_vs_one": one_node["tokens_per_s"] / single["tokens_per_s"],
        "two_nodes_vs_one": two_nodes["tokens_per_s"] / one_node["tokens_per_s"],
        "comm_share": {
            "2 processes, 1 node": one_node["comm_share"],
            "2 nodes x 1 process": two_nodes["comm_share"],
        },
        "per_rank": {"ddp": one_node["bytes"], "fsdp": fsdp["bytes"]},
        "peak_rss_gib": {"ddp": one_node["peak_rss_gib"], "fsdp": fsdp["peak_rss_gib"]},
        "fsdp_vs_ddp_bytes": fsdp["bytes"]["total"] / one_node["bytes"]["total"],
        "presets": _preset_plans(),
    }


def _launch(out: Path, mode: str, steps: int, batch: int, nodes: int, procs: int) -> dict[str, Any]:
    """Start `nodes` torchrun agents of `procs` workers each; rank 0's report."""
    out.mkdir(parents=True, exist_ok=True)
    worker = ["-m", "benchmarks.distributed", "--worker", "--mode", mode, "--steps", str(steps)]
    worker += ["--global-batch", str(batch), "--out", str(out / "rank0.json")]
    env = {
        **os.environ,
        **QUIET_ENV,
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // (nodes * procs))),
    }
    if nodes == 1:
        rdzv = ["--standalone"]
    else:
        rdzv = [
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{_free_port()}",
            "--rdzv-id",
            out.name,
        ]
    agents = []
    for node in range(nodes):
        cmd = [PYTHON, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(procs)]
        cmd += [*rdzv, *(["--node-rank", str(node)] if nodes > 1 else []), *worker]
        home = out / f"node{node}"  # each "node" its own working directory, as on two machines
        home.mkdir(exist_ok=True)
        with (home / "agent.log").open("wb") as log:
            agents.append(
                subprocess.Popen(
                    cmd,
                    cwd=home,
                    env={**env, "HOME": str(home), "PYTHONPATH": str(REPO_ROOT)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        codes = [a.wait(timeout=1800) for a in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    if any(codes):
        logs = [(out / f"node{n}" / "agent.log").read_text(errors="replace")[-2000:] for n in range(nodes)]
        raise RuntimeError(f"{out.name}: a torchrun agent failed:\n" + "\n".join(logs))
    return json.loads((out / "rank0.json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _preset_plans() -> dict[str, Any]:
    """Per-GPU memory of the 7B and 70B presets on MI300X from the meta device, as shipped; where a preset
    shards with FSDP, also what DDP (a whole copy of the base per GPU) would take."""
    from tasks.core.config import load_config
    from tasks.stages.train.capacity import capacity_plan

    keys = ("processes", "distributed", "memory_per_gpu_gib", "fits")
    plans: dict[str, Any] = {}
    for name in ("llama2-7b-mi300x", "llama2-70b-8xmi300x"):
        path = REPO_ROOT / "params" / f"{name}.yaml"
        shipped = capacity_plan(load_config(path))
        plans[name] = {"shipped": {k: shipped[k] for k in keys}}
        if shipped["distributed"] == "fsdp":
            ddp = capacity_plan(load_config(path, overrides=[("train.distributed", "ddp")]))
            plans[name]["ddp"] = {k: ddp[k] for k in keys}
    return plans


# ----------------------------------------------------------------------------------------------------
# The worker (under torchrun)
# ----------------------------------------------------------------------------------------------------


def _model(mode: str) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # every rank the same random base and adapter
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    if torch.distributed.get_world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    return model


def _local_bytes(tensors: Any) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _held(model: Any, optimizer: Any) -> dict[str, int]:
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel") and v.dim() > 0]
    held = {
        "params": _local_bytes(params),
        "grads": _local_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": _local_bytes(state),
    }
    held["total"] = sum(held.values())
    return held


def _steps(model: Any, optimizer: Any, batch: int, steps: int, ddp: bool) -> dict[str, float]:
    """Median seconds per optimizer step, with gradient sync and (DDP) under `no_sync()` (no all-reduce),
    the two taking turns so that drift on a shared machine falls on both alike; two warm-up steps."""
    import torch

    times: dict[str, list[float]] = {"synced": [], "local": []}
    kinds = ["synced", "synced"] + ["synced", "local"] * steps if ddp else ["synced"] * (steps + 2)
    for i, kind in enumerate(kinds):
        x = torch.randint(0, MODEL["vocab_size"], (batch, SEQ))
        t = time.perf_counter()
        if kind == "local":
            with model.no_sync():
                model(input_ids=x, labels=x).loss.backward()
        else:
            model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if i >= 2:
            times[kind].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items() if v}


def worker(mode: str, steps: int, global_batch: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    model = _model(mode)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    per_rank = max(1, global_batch // world)
    step = _steps(model, optimizer, per_rank, steps, ddp=mode == "ddp" and world > 1)
    synced = step["synced"]
    report: dict[str, Any] = {"mode": mode, "world": world, "bytes": _held(model, optimizer), "step_s": step}
    if "local" in step:
        report["comm_share"] = max(0.0, 1 - step["local"] / synced)
    report["tokens_per_s"] = per_rank * world * SEQ / synced
    report["params_total"] = sum(p.numel() for p in model.parameters())  # a DTensor counts its whole
    report["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    report["peak_rss_gib"] = float(peak)
    if rank == 0:
        out.write_text(json.dumps(report))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.distributed", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--worker", action="store_true", help="run as one torchrun worker")
    parser.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("rank0.json"))
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.mode, args.steps, args.global_batch, args.out)
        return 0
    import tempfile

    print(json.dumps(run(Path(tempfile.mkdtemp(prefix="qa-lora-dist-")), quick=True), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
