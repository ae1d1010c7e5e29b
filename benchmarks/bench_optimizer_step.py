"""Time one optimizer step: MUNBa's backends against naive combination and torch's fused AdamW.

Variants, on the same parameters and gradients, timed interleaved (round-robin) so that load
from other processes on a shared machine hits all of them alike:
  fused-adamw    torch.optim.AdamW(fused=True) on one gradient: the single-objective floor
  naive-sum      d = g_f + g_r, then torch.optim.AdamW(fused=True): what most unlearning code does
  plain-ops      MUNBa in plain torch ops: three dot products, combine, foreach AdamW
  munba-<name>   MUNBaOptimizer(backend=<name>) for every backend usable on the device
  copy-probe     a copy of 8 bytes per parameter (the Gram's traffic), measured in the same run
                 to give every row an effective bandwidth and its share of the probe's

Each row reports the median and the inter-quartile spread of the step time, the ratio to
fused AdamW and the effective bandwidth (bytes a step must move / time).  The bytes per
fp32 parameter: fused AdamW 28 (read p, g, m, v; write p, m, v), a MUNBa step 40 (the Gram
reads g_f, g_r; the update reads g_f, g_r, p, m, v and writes p, m, v).

    python benchmarks/bench_optimizer_step.py [--numel 20000000] [--tensors 10] [--dtype float32]
        [--device cpu|cuda] [--rounds 15] [--quick] [--out results.json] [--markdown results.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from munba_kernels import MUNBaOptimizer, backends

# Arrays an ideal implementation of each row's math reads + writes per parameter (× element
# size): AdamW alone 4 + 3; summed gradients 5 + 3; MUNBa (Gram 2, update 5 + 3) 10; probe 1 + 1.
BYTES_PER_ELEMENT = {"fused-adamw": 7, "naive-sum": 8, "copy-probe": 2}
MUNBA_BYTES_PER_ELEMENT = 10


def make_variants(numel: int, tensors: int, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(0)
    sizes = [numel // tensors] * tensors

    def randn(n):
        return torch.randn(n, generator=gen).to(device=device, dtype=dtype)

    start = [randn(n) for n in sizes]
    g_f = [randn(n) for n in sizes]
    g_r = [randn(n) for n in sizes]

    def params():
        return [torch.nn.Parameter(t.clone()) for t in start]

    def adamw_on(grads_of):
        ps = params()
        opt = torch.optim.AdamW(ps, lr=1e-4, fused=True)

        def step():
            for p, g in zip(ps, grads_of()):
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

    probe_dst = [torch.empty_like(g) for g in g_f]

    def probe():
        torch._foreach_copy_(probe_dst, g_f)

    variants = {
        "fused-adamw": adamw_on(lambda: g_f),
        "naive-sum": adamw_on(lambda: torch._foreach_add(g_f, g_r)),
        "plain-ops": plain_step,
    }
    for name in backends.available():
        try:
            backends.resolve(name, torch.device(device))
        except RuntimeError:  # e.g. the C++ kernels on a GPU
            continue
        variants[f"munba-{name}"] = munba(name)
    variants["copy-probe"] = probe
    return variants


def run(numel: int, tensors: int, dtype: torch.dtype, device: str, rounds: int) -> dict:
    variants = make_variants(numel, tensors, dtype, device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for step in variants.values():  # warm-up: state allocation, first-touch page faults, kernels
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            sync()
            begin = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - begin)
    size = torch.finfo(dtype).bits // 8
    rows = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        moved = numel * size * BYTES_PER_ELEMENT.get(name, MUNBA_BYTES_PER_ELEMENT)
        rows[name] = dict(median_ms=q[1] * 1e3, iqr_ms=(q[2] - q[0]) * 1e3, gb_per_s=moved / q[1] / 1e9)
    for row in rows.values():
        row["vs_fused_adamw"] = row["median_ms"] / rows["fused-adamw"]["median_ms"]
        row["pct_of_probe_bandwidth"] = 100 * row["gb_per_s"] / rows["copy-probe"]["gb_per_s"]
    return dict(
        numel=numel,
        tensors=tensors,
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        threads=torch.get_num_threads(),
        rounds=rounds,
        rows=rows,
        times_s=times,
    )


def markdown(result: dict) -> str:
    lines = [
        f"{result['numel']:,} {result['dtype']} params in {result['tensors']} tensors on {result['device']}, "
        f"{result['threads']} threads, median of {result['rounds']} interleaved rounds",
        "",
        "| variant | median ms | IQR ms | vs fused AdamW | effective GB/s | % of copy probe |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {r['vs_fused_adamw']:.2f}× | "
            f"{r['gb_per_s']:.1f} | {r['pct_of_probe_bandwidth']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=20_000_000)
    parser.add_argument("--tensors", type=int, default=10)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="1M params, 3 rounds (a smoke test)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write the table as Markdown here")
    args = parser.parse_args(argv)
    numel, rounds = (1_000_000, 3) if args.quick else (args.numel, args.rounds)
    result = run(numel, args.tensors, getattr(torch, args.dtype), args.device, rounds)
    table = markdown(result)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table)
    return result


if __name__ == "__main__":
    main()
