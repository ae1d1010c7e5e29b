"""Optimizer-step time under FSDP2 at world size 1 and 2: MUNBa against torch's AdamW.

MUNBa's only communication is one all-reduce of three float64 Gram partials (24 bytes) per
step; everything else runs on the local shards.  This script shards an MLP with
``fully_shard`` over gloo (CPU) or NCCL (one GPU per rank), produces forget and preserve
gradients by two backward passes, and times ``opt.step()`` alone — MUNBa (backend
``auto``) against ``torch.optim.AdamW(fused=True)`` on the preserve gradient (the
single-objective floor) — with the ranks synchronised by a barrier before every timed step.
Each world size runs in its own processes (spawned here, no torchrun needed).

    python benchmarks/bench_distributed_step.py [--numel 8000000] [--worlds 1,2] [--steps 20]
        [--device cpu|cuda] [--out results.json] [--markdown results.md] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_output import emit
from torch import nn

from munba_kernels import MUNBaOptimizer

LAYERS = 8


def build_model(numel: int) -> nn.Module:
    """LAYERS square linear layers holding ~numel parameters in total."""
    width = max(2, int((numel / LAYERS) ** 0.5))
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(LAYERS)))


def _worker(rank: int, world: int, args: dict, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}" if args["device"] == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard

    model = build_model(args["numel"]).to(device)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    width = model[0].in_features
    x = torch.randn(16, width, device=device)
    optimizers = {
        "munba": MUNBaOptimizer(model.parameters(), lr=1e-4),
        "adamw": torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True),
    }
    times: dict[str, list[float]] = {name: [] for name in [*optimizers, "all-reduce"]}
    gram = torch.zeros(3, dtype=torch.float64, device=device)
    for step in range(args["steps"] + 2):  # two warm-up rounds
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(gram)  # the collective MUNBa adds, alone: its latency on this transport
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times["all-reduce"].append((time.perf_counter() - start) * 1e3)
        for name, opt in optimizers.items():  # interleaved: load hits both alike
            model(x).square().mean().backward()
            if name == "munba":
                opt.capture_forget()
                model(x).mean().backward()
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            opt.zero_grad(set_to_none=True)
            if step >= 2:
                times[name].append(elapsed * 1e3)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        Path(out).write_text(json.dumps({"params": params, "times_ms": times}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(numel: int, worlds: list[int], steps: int, device: str) -> list[dict]:
    rows = []
    for world in worlds:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            args = dict(numel=numel, steps=steps, device=device)
            mp.spawn(_worker, args=(world, args, _free_port(), tmp.name), nprocs=world, join=True)
            result = json.loads(Path(tmp.name).read_text())
        med = {name: statistics.median(t) for name, t in result["times_ms"].items()}
        rows.append(
            {
                "world": world,
                "params": result["params"],
                "munba_ms": med["munba"],
                "adamw_ms": med["adamw"],
                "ratio": med["munba"] / med["adamw"],
                "all_reduce_ms": med["all-reduce"],
                "extra_bytes_communicated": 24,
            }
        )
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [
        f"FSDP2 optimizer step on {device}, median ms (MUNBa adds one 24-byte all-reduce per step)",
        "",
        "| world size | parameters | MUNBa step ms | fused AdamW step ms | MUNBa / AdamW | 24-byte all-reduce ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world']} | {r['params'] / 1e6:.1f}M | {r['munba_ms']:.2f} | {r['adamw_ms']:.2f} | {r['ratio']:.2f}× | {r['all_reduce_ms']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=8_000_000, help="parameters in the model")
    p.add_argument("--worlds", default="1,2", help="comma list of world sizes")
    p.add_argument("--steps", type=int, default=20, help="timed steps per world size")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--markdown", help="write the Markdown table here")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    a = p.parse_args(argv)
    worlds = [int(w) for w in a.worlds.split(",")]
    if any(w < 1 for w in worlds):
        p.error(f"--worlds: world sizes must be positive, got {a.worlds!r}")
    if a.device == "cuda" and torch.cuda.device_count() < max(worlds):
        p.error(f"--device cuda needs {max(worlds)} GPUs, found {torch.cuda.device_count()}")
    numel, steps = (20_000, 2) if a.quick else (a.numel, a.steps)
    rows = run(numel, worlds, steps, a.device)
    emit(rows, markdown(rows, a.device), a.out, a.markdown)
    return rows


if __name__ == "__main__":
    main()
