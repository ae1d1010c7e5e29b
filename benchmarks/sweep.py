"""One command for the optimizer-step size sweep: pytest-benchmark timings → JSON, Markdown, plot.

Runs benchmarks/test_bench_step.py under pytest-benchmark over sizes × tensor counts × dtypes ×
variants, measures each variant's peak memory beyond fused AdamW in fresh subprocesses, and
writes into --out:
  pytest-benchmark.json   pytest-benchmark's own record (machine info, every round)
  sweep.json              per configuration, the same rows as bench_optimizer_step.py
  sweep.md                a summary (ratio to fused AdamW per size) and one table per configuration
  headline.png            ratio to fused AdamW against size, one line per variant (benchmarks/plot.py)

    python benchmarks/sweep.py --out DIR [--sizes 1e6,1e7,1e8] [--tensors 10,200]
        [--dtypes float32,bfloat16] [--variants ...] [--rounds 10] [--memory largest|all|none]
        [--device cpu|cuda] [--quick]

The defaults take about 15 minutes on a 2-core CPU, half of it torch.compile (once per
configuration with at most --compile-max-tensors tensors; leave plain-ops-compiled out of
--variants to skip it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from bench_optimizer_step import VARIANTS, add_memory, markdown, measure_memory, parse_variants, summarize
from plot import plot_results

HERE = Path(__file__).resolve().parent
QUICK = dict(sizes="100000", tensors="4", dtypes="float32,bfloat16", rounds=3, memory="largest")
QUICK_VARIANTS = [v for v in VARIANTS if v != "plain-ops-compiled"]  # compiling takes a minute even when tiny


class _SkipCollector:
    """pytest plugin: why each variant did not run (an unbuilt backend, a failed compile)."""

    def __init__(self):
        self.skipped: list[tuple[dict, str]] = []

    def pytest_runtest_logreport(self, report):
        if report.skipped and report.when == "call":
            info = dict(report.user_properties).get("step")
            if info:
                self.skipped.append((info, report.longrepr[2].removeprefix("Skipped: ")))


def _config_key(info: dict) -> tuple:
    return info["numel"], info["tensors"], info["dtype"]


def collect(raw: dict, skipped: list[tuple[dict, str]], rounds: int) -> list[dict]:
    """Per-configuration results (bench_optimizer_step.run's shape) from pytest-benchmark's JSON."""
    stats, infos, unavailable = defaultdict(dict), {}, defaultdict(dict)
    for bench in raw["benchmarks"]:
        info = bench["extra_info"]
        key = _config_key(info)
        infos[key] = info
        stats[key][info["variant"]] = (bench["stats"]["median"], bench["stats"]["iqr"])
    for info, reason in skipped:
        infos.setdefault(_config_key(info), info)
        unavailable[_config_key(info)][info["variant"]] = reason
    results = []
    for key in sorted(infos, key=lambda k: (k[2], k[1], k[0])):
        numel, tensors, dtype = key
        info = infos[key]
        rows = summarize(stats[key], numel, getattr(torch, dtype))
        rows.update({v: dict(unavailable=r) for v, r in unavailable[key].items()})
        order = [v for v in VARIANTS if v in rows]
        results.append(
            dict(
                numel=numel,
                tensors=tensors,
                dtype=dtype,
                device=info["device"],
                threads=info["threads"],
                rounds=rounds,
                timing="pytest-benchmark, variants back to back",
                rows={v: rows[v] for v in order},
            )
        )
    return results


def summary_table(results: list[dict]) -> str:
    """Variants down, configurations across: median step time as a multiple of fused AdamW's."""
    heads = [f"{r['numel'] / 1e6:g}M {r['dtype']} ×{r['tensors']}" for r in results]
    variants = [v for v in VARIANTS if any(v in r["rows"] for r in results)]
    lines = [
        "| variant | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for v in variants:
        cells = []
        for r in results:
            row = r["rows"].get(v, {})
            cells.append(f"{row['vs_fused_adamw']:.2f}×" if "vs_fused_adamw" in row else "–")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the JSON, Markdown and PNG files")
    p.add_argument("--sizes", default="1e6,1e7,1e8", help="parameter counts, comma-separated (default 1e6,1e7,1e8)")
    p.add_argument("--tensors", default="10,200", help="tensor counts, comma-separated (default 10,200)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="float32 and/or bfloat16")
    p.add_argument("--variants", type=parse_variants, help="comma-separated subset (default: all)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per variant (default 10)")
    p.add_argument(
        "--memory",
        choices=("largest", "all", "none"),
        default="largest",
        help="configurations whose peak memory is measured (default: the largest size's)",
    )
    p.add_argument(
        "--compile-max-tensors",
        type=int,
        default=10,
        help="run plain-ops-compiled only up to this many tensors (default 10: compiling the "
        "200-tensor step took over 10 minutes on 2 CPU cores)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="100k params in 4 tensors, 3 rounds, no compile (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
        args.variants = args.variants or QUICK_VARIANTS
    variants = args.variants or list(VARIANTS)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    for dtype in args.dtypes.split(","):
        if dtype not in ("float32", "bfloat16"):
            p.error(f"--dtypes takes float32 and/or bfloat16, got {dtype!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    collector = _SkipCollector()
    raw_path = out / "pytest-benchmark.json"
    code = pytest.main(
        [
            str(HERE / "test_bench_step.py"),
            "-s",
            "-p",
            "no:cacheprovider",
            "--benchmark-json",
            str(raw_path),
            "--benchmark-columns=median,iqr,min,rounds",
            "--benchmark-group-by=group",
            "--step-sizes",
            args.sizes,
            "--step-tensors",
            args.tensors,
            "--step-dtypes",
            args.dtypes,
            "--step-variants",
            ",".join(variants),
            "--step-rounds",
            str(args.rounds),
            "--step-compile-max-tensors",
            str(args.compile_max_tensors),
            "--step-device",
            args.device,
        ],
        plugins=[collector],
    )
    if code != 0:
        sys.exit(f"the pytest-benchmark run failed (exit code {code})")
    results = collect(json.loads(raw_path.read_text()), collector.skipped, args.rounds)

    if args.memory != "none":
        largest = max(r["numel"] for r in results)
        for r in results:
            if args.memory == "all" or r["numel"] == largest:
                print(f"[sweep] peak memory, {r['numel']:,} {r['dtype']} params in {r['tensors']} tensors", flush=True)
                dtype = getattr(torch, r["dtype"])
                ran = [v for v, row in r["rows"].items() if "unavailable" not in row]
                add_memory(r["rows"], measure_memory(r["numel"], r["tensors"], dtype, r["device"], ran), r["numel"], dtype)

    (out / "sweep.json").write_text(json.dumps(dict(configs=results), indent=2))
    text = "## Step time as a multiple of fused AdamW's\n\n" + summary_table(results)
    text += "".join("\n" + markdown(r) for r in results)
    (out / "sweep.md").write_text(text)
    plot_results([dict(configs=results)], out / "headline.png")
    print(text)
    print(f"[sweep] wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'headline.png'}")
    return results


if __name__ == "__main__":
    main()
