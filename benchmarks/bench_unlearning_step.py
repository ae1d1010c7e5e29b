"""Time one whole unlearning step on a real model: this package against the published recipe.

Variants, each a full step on a batch of forget and a batch of retain data:
  munba      forget backward → capture_forget → retain backward → MUNBaOptimizer.step
             (2 backward passes, no flattened copies; paper_faithful settings)
  published  the published code's recipe: two autograd.grad(..., retain_graph=True) calls,
             both gradients flattened, closed-form weights (with its +1e-8 terms), a third
             backward on the weighted loss, clip_grad_norm_(1.0), SGD step
  naive      (forget loss + retain loss).backward(), SGD step: the same compute as two
             backward passes, so it is the floor; everything above it is bargaining's cost

Times are medians of interleaved rounds in one process.  Peak memory is measured per
variant in a fresh subprocess (CUDA: max_memory_allocated; CPU: the sampled peak of the
resident set over its value after set-up), reported as the extra bytes a step needs over
the model and its data (optimizer state included).

    python benchmarks/bench_unlearning_step.py [--model resnet18] [--batch 64] [--device cpu]
                                               [--rounds 10] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

from munba_kernels import MUNBaOptimizer
from munba_kernels.drivers.models import build_model

VARIANTS = ("munba", "published", "naive")


def make_step(variant: str, model, xf, yf, xr, yr):
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "munba":
        opt = MUNBaOptimizer.paper_faithful(params)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xf), yf).backward()
            opt.capture_forget()
            F.cross_entropy(model(xr), yr).backward()
            opt.step()

        return step
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    if variant == "naive":

        def step():
            opt.zero_grad(set_to_none=True)
            (F.cross_entropy(model(xf), yf) + F.cross_entropy(model(xr), yr)).backward()
            opt.step()

        return step

    def step():  # the published recipe, as its code does it
        opt.zero_grad(set_to_none=True)
        loss_f = F.cross_entropy(model(xf), yf)
        loss_r = F.cross_entropy(model(xr), yr)
        g_f = torch.cat([g.flatten() for g in torch.autograd.grad(loss_f, params, retain_graph=True)])
        g_r = torch.cat([g.flatten() for g in torch.autograd.grad(loss_r, params, retain_graph=True)])
        G = torch.stack([g_r, g_f])
        gram = G @ G.T
        ff, fr, rr = gram[1, 1], gram[0, 1], gram[0, 0]
        cos = fr / (torch.sqrt(ff * rr) + 1e-8)
        alpha_r = 1 / (torch.sqrt(rr) * torch.sqrt(1 + cos) + 1e-8)
        alpha_f = 1 / (torch.sqrt(ff) * torch.sqrt(1 + cos) + 1e-8)
        (alpha_f.detach() * loss_f + alpha_r.detach() * loss_r).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def setup(args):
    torch.manual_seed(0)
    model = build_model(args.model, 3, 10).to(args.device)
    gen = torch.Generator().manual_seed(0)
    xf, xr = (torch.randn(args.batch, 3, 32, 32, generator=gen).to(args.device) for _ in range(2))
    yf, yr = (torch.randint(0, 10, (args.batch,), generator=gen).to(args.device) for _ in range(2))
    return model, xf, yf, xr, yr


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_bytes(args, variant: str) -> int:
    """Run a few steps of one variant in this (fresh) process; bytes a step adds at its peak.

    On the CPU a thread samples the resident set every millisecond (large tensors are
    mmap-allocated, so freeing them lowers it again); the peak over the steps minus the
    resident set before them is what the steps needed beyond the model and its data.
    """
    model, *data = setup(args)
    step = make_step(variant, model, *data)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base, peak, done = _resident_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(3):
        step()
    done.set()
    sampler.join()
    return max(peak[0] - base, 0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=("resnet18", "narrow_resnet"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="narrow_resnet, batch 8, 2 rounds (a smoke test)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--memory-probe", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one subprocess
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.rounds = "narrow_resnet", 8, 2
    if args.memory_probe:
        print(peak_extra_bytes(args, args.memory_probe))
        return {}

    model, *data = setup(args)
    steps = {}
    for v in VARIANTS:  # each variant gets its own copy of the model, same data
        m = build_model(args.model, 3, 10).to(args.device)
        m.load_state_dict(model.state_dict())
        steps[v] = make_step(v, m, *data)
        steps[v]()  # warm-up: optimizer state, allocator, kernels
    times = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v in VARIANTS:
            sync(args.device)
            start = time.perf_counter()
            steps[v]()
            sync(args.device)
            times[v].append(time.perf_counter() - start)
    common = ["--model", args.model, "--batch", str(args.batch), "--device", args.device]
    memory = {}
    for v in VARIANTS:
        proc = subprocess.run(
            [sys.executable, __file__, *common, "--memory-probe", v],
            capture_output=True,
            text=True,
            check=True,
        )
        memory[v] = int(proc.stdout.split()[-1])
    median = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model} ({n_params / 1e6:.1f}M params), forget + retain batches of {args.batch} at 32×32, "
        f"{args.device}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds\n"
    )
    print("| variant | ms / step | vs published | vs naive | extra peak memory (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for v in VARIANTS:
        print(
            f"| {v} | {median[v]:.1f} | {median[v] / median['published']:.2f}× | "
            f"{median[v] / median['naive']:.2f}× | {memory[v] / 2**20:.0f} |"
        )
    result = dict(
        model=args.model,
        params=n_params,
        batch=args.batch,
        device=args.device,
        threads=torch.get_num_threads(),
        rounds=args.rounds,
        median_ms=median,
        times_s=times,
        extra_peak_bytes=memory,
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
