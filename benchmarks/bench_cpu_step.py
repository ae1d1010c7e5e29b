"""Time one MUNBa + AdamW step on CPU: the C++ backend against torch baselines.

Variants, timed interleaved (round-robin) so that load from other processes on a shared
machine hits all of them alike:
  fused-adamw   torch.optim.AdamW(fused=True) with one gradient (the floor: one pass)
  munba-torch   MUNBaOptimizer(backend="torch")
  munba-cpp     MUNBaOptimizer(backend="cpp")
  plain-ops     the same math in plain torch ops: three dot products, combine, foreach AdamW

    python benchmarks/bench_cpu_step.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from munba_kernels import MUNBaOptimizer, backends


def make_variants(numel: int, tensors: int):
    gen = torch.Generator().manual_seed(0)
    sizes = [numel // tensors] * tensors
    start = [torch.randn(n, generator=gen) for n in sizes]
    g_f = [torch.randn(n, generator=gen) for n in sizes]
    g_r = [torch.randn(n, generator=gen) for n in sizes]

    def params():
        return [torch.nn.Parameter(t.clone()) for t in start]

    fused_params = params()
    fused = torch.optim.AdamW(fused_params, lr=1e-4, fused=True)

    def fused_step():
        for p, g in zip(fused_params, g_f):
            p.grad = g
        fused.step()

    def munba(backend):
        ps = params()
        opt = MUNBaOptimizer(ps, lr=1e-4, backend=backend)

        def step():
            for p, g in zip(ps, g_f):
                p.grad = g
            opt.capture_forget()
            for p, g in zip(ps, g_r):
                p.grad = g
            opt.step()

        return step

    plain_params = params()
    plain = torch.optim.AdamW(plain_params, lr=1e-4, foreach=True)

    def plain_step():
        ff = sum(torch.dot(f, f) for f in g_f)
        fr = sum(torch.dot(f, r) for f, r in zip(g_f, g_r))
        rr = sum(torch.dot(r, r) for r in g_r)
        scale = 1 / torch.sqrt(1 + fr / torch.sqrt(ff * rr))
        a_f, a_r = scale / torch.sqrt(ff), scale / torch.sqrt(rr)
        for p, f, r in zip(plain_params, g_f, g_r):
            p.grad = f * a_f + r * a_r
        plain.step()

    variants = {"fused-adamw": fused_step, "munba-torch": munba("torch")}
    if "cpp" in backends.available():  # not built: the table simply has no cpp row
        variants["munba-cpp"] = munba("cpp")
    variants["plain-ops"] = plain_step
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2M params, 3 rounds (a smoke test)")
    parser.add_argument("--numel", type=int, default=20_000_000)
    parser.add_argument("--tensors", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    numel, rounds = (2_000_000, 3) if args.quick else (args.numel, args.rounds)

    variants = make_variants(numel, args.tensors)
    for step in variants.values():  # warm-up: state allocation, first-touch page faults
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            begin = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - begin)

    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(
        f"{numel:,} fp32 params in {args.tensors} tensors, {torch.get_num_threads()} threads, "
        f"median of {rounds} interleaved rounds\n"
    )
    fastest = "munba-cpp" if "munba-cpp" in medians else "munba-torch"
    print(f"| variant | median ms | vs fused-adamw | vs {fastest} |")
    print("|---|---:|---:|---:|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.2f} | {ms / medians['fused-adamw']:.2f}x | {ms / medians[fastest]:.2f}x |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                dict(
                    numel=numel,
                    tensors=args.tensors,
                    threads=torch.get_num_threads(),
                    rounds=rounds,
                    median_ms=medians,
                    times_s=times,
                ),
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
