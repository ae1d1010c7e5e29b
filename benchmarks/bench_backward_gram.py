"""The step with the Gram pass folded into backward (``gram_in_backward=True``) against the two-pass
step, the naive sum and torch's fused AdamW, on a real forward/backward.

An MLP of ``--layers`` square layers (weights and biases: 2 × layers tensors, ``--width``² each);
every round runs, for each variant in turn (interleaved, so load from other processes hits all
alike), the variant's backward passes and then ``opt.step()``, timing the two apart:

  fused-adamw   one loss, one backward, torch.optim.AdamW(fused=True): the single-objective floor
  naive-sum     both losses backward into one .grad (the sum), AdamW(fused=True)
  munba         both backward passes, capture, MUNBaOptimizer(backend=cpp) two-pass step
  munba-hooks   the same with gram_in_backward=True: the Gram partials are computed in backward

    python benchmarks/bench_backward_gram.py [--width 2000] [--layers 5] [--batch 8] [--rounds 15]
        [--threads N] [--out results.json] [--markdown results.md] [--quick]

Reports the median and IQR of step() and of the backward passes per variant, and step() as a
multiple of fused AdamW's.  Timings are never asserted by a test: machines here are shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from munba_kernels import MUNBaOptimizer

VARIANTS = ("fused-adamw", "naive-sum", "munba", "munba-hooks")


def make_model(width: int, layers: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*blocks)


def make_variant(name: str, width: int, layers: int, batch: int, backend: str) -> Callable[[int], tuple]:
    """A callable running one round of ``name``: returns (backward seconds, step seconds, the
    tensors whose Gram partials came from the hooks, or None)."""
    model = make_model(width, layers)
    gen = torch.Generator().manual_seed(1)
    x_f, x_r = torch.randn(batch, width, generator=gen), torch.randn(batch, width, generator=gen)
    if name in ("fused-adamw", "naive-sum"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    else:
        opt = MUNBaOptimizer(model.parameters(), lr=1e-4, backend=backend, gram_in_backward=name == "munba-hooks")

    def one_round(_: int) -> tuple[float, float]:
        opt.zero_grad(set_to_none=True)
        begin = time.perf_counter()
        if name != "fused-adamw":
            (-model(x_f).pow(2).mean()).backward()
            if isinstance(opt, MUNBaOptimizer):
                opt.capture_forget()
        model(x_r).pow(2).mean().backward()
        middle = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        hooks = getattr(opt, "_backward_gram", None)
        return middle - begin, end - middle, None if hooks is None else hooks.hits

    return one_round


def median_and_iqr(ts: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return q[1], q[2] - q[0]


def run(width: int, layers: int, batch: int, rounds: int, backend: str = "cpp", names=VARIANTS) -> dict:
    variants = {n: make_variant(n, width, layers, batch, backend) for n in names}
    for fn in variants.values():  # warm-up: kernels loaded, states created
        fn(0)
    times = {n: ([], []) for n in names}
    hits: dict[str, int | None] = {}
    for r in range(rounds):
        for n, fn in variants.items():
            backward, step, hits[n] = fn(r)
            times[n][0].append(backward)
            times[n][1].append(step)
    rows = {}
    for n, (backward, step) in times.items():
        (b_med, b_iqr), (s_med, s_iqr) = median_and_iqr(backward), median_and_iqr(step)
        rows[n] = dict(backward_ms=b_med * 1e3, backward_iqr_ms=b_iqr * 1e3, step_ms=s_med * 1e3, step_iqr_ms=s_iqr * 1e3)
        if hits[n] is not None:
            rows[n]["tensors_from_hooks"] = hits[n]  # in the last round; 2 × layers when every hook was used
    for row in rows.values():
        if "fused-adamw" in rows:
            row["step_vs_fused_adamw"] = row["step_ms"] / rows["fused-adamw"]["step_ms"]
    params = sum(p.numel() for p in make_model(width, layers).parameters())
    return dict(
        params=params, tensors=2 * layers, width=width, layers=layers, batch=batch, rounds=rounds,
        backend=backend, threads=torch.get_num_threads(), rows=rows, times_s=times,
    )  # fmt: skip


def markdown(result: dict) -> str:
    lines = [
        f"MLP {result['layers']}×{result['width']}² ({result['params']:,} fp32 params in {result['tensors']} tensors), "
        f"batch {result['batch']}, {result['threads']} threads, median of {result['rounds']} interleaved rounds",
        "",
        "| variant | step() ms | IQR | step vs fused AdamW | backward ms | IQR | backward + step ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        ratio = f"{r['step_vs_fused_adamw']:.2f}×" if "step_vs_fused_adamw" in r else "–"
        lines.append(
            f"| {name} | {r['step_ms']:.2f} | {r['step_iqr_ms']:.2f} | {ratio} | {r['backward_ms']:.2f} | "
            f"{r['backward_iqr_ms']:.2f} | {r['step_ms'] + r['backward_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=_positive, default=2000, help="layer width (5 layers of 2000²: 20M params in 10 tensors)")
    p.add_argument("--layers", type=_positive, default=5)
    p.add_argument("--batch", type=_positive, default=8)
    p.add_argument("--rounds", type=_positive, default=15)
    p.add_argument("--backend", choices=("cpp", "torch"), default="cpp")
    p.add_argument("--threads", type=_positive, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", help="write the result as JSON")
    p.add_argument("--markdown", help="write the table as Markdown")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds (CI smoke run)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.width, a.layers, a.rounds = 64, 2, 3
    result = run(a.width, a.layers, a.batch, a.rounds, a.backend)
    table = markdown(result)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table)
    return result


if __name__ == "__main__":
    main()
