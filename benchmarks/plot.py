"""The headline plot: what MUNBa costs per optimizer step, and per whole unlearning step.

    python benchmarks/plot.py RESULTS.json [RESULTS.json ...] --out headline.png

Takes sweep.json files (benchmarks/sweep.py: one panel per dtype × tensor count, step time as a
multiple of fused AdamW's against size, one line per variant) and end-to-end JSON files
(benchmarks/bench_unlearning_step.py --out: one panel per model, ms per unlearning step per
variant, extra peak memory written on each bar), in any mix.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from munba_kernels.evaluation.report import _pyplot

# One colour per variant in every panel (the matplotlib cycle would shift when a row is missing).
COLOURS = {
    "naive-sum": "tab:blue",
    "plain-ops": "tab:orange",
    "plain-ops-compiled": "tab:olive",
    "munba-torch": "tab:green",
    "munba-cpp": "tab:red",
    "munba-triton": "tab:purple",
}
RATIO_TICKS = (1, 1.5, 2, 3, 5, 10, 20, 50)


def _sweep_panels(sweep: dict) -> dict[tuple, list[dict]]:
    panels: dict[tuple, list[dict]] = {}
    for config in sweep["configs"]:
        panels.setdefault((config["dtype"], config["tensors"], config["device"]), []).append(config)
    return panels


def _plot_sweep_panel(ax, key: tuple, configs: list[dict]) -> None:
    configs = sorted(configs, key=lambda c: c["numel"])
    variants = [v for v in configs[0]["rows"] if v not in ("fused-adamw", "copy-probe")]
    for variant in variants:
        points = [
            (c["numel"], c["rows"][variant]["vs_fused_adamw"])
            for c in configs
            if "vs_fused_adamw" in c["rows"].get(variant, {})
        ]
        if points:
            style = "-o" if variant.startswith("munba") else "--."
            wide = variant in ("munba-cpp", "munba-triton")
            ax.plot(*zip(*points), style, label=variant, color=COLOURS.get(variant), lw=2 if wide else 1)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(10 / 7, color="grey", lw=0.8, ls=":", label="bandwidth floor (40/28 B)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_yticks(RATIO_TICKS, [f"{t:g}×" for t in RATIO_TICKS])
    ax.minorticks_off()
    ax.set_xlabel("parameters")
    ax.set_ylabel("step time / fused AdamW's")
    dtype, tensors, device = key
    ax.set_title(f"{dtype}, {tensors} tensors, {device}")


def _plot_e2e_panel(ax, result: dict) -> None:
    names = list(result["median_ms"])
    times = [result["median_ms"][n] for n in names]
    bars = ax.bar(names, times, color=["tab:blue" if n == "munba" else "tab:grey" for n in names])
    for bar, name in zip(bars, names):
        if name not in result["extra_peak_bytes"]:  # measured with --no-memory
            continue
        mib = result["extra_peak_bytes"][name] / 2**20
        ax.annotate(f"+{mib:.0f} MiB", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set_ylabel("ms per unlearning step")
    ax.set_ylim(0, max(times) * 1.2)  # room for the memory labels
    ax.set_title(f"{result['model']} ({result['params'] / 1e6:.1f}M), batch {result['batch']}, {result['device']}")


def plot_results(results: list[dict], path: str | Path) -> None:
    """One PNG with a panel per sweep configuration group and per end-to-end result."""
    panels = []
    for result in results:
        if "configs" in result:
            panels += [("sweep", key, configs) for key, configs in _sweep_panels(result).items()]
        elif "median_ms" in result:
            panels.append(("e2e", result, None))
        else:
            raise ValueError("each results file must come from sweep.py or bench_unlearning_step.py --out")
    if not panels:
        raise ValueError("no results to plot")
    plt = _pyplot()
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, (kind, a, b) in zip(axes.flat, panels):
        if kind == "sweep":
            _plot_sweep_panel(ax, a, b)
        else:
            _plot_e2e_panel(ax, a)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    legend = {}  # every variant any panel drew, once
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles = list(legend.values())
    if handles:
        fig.legend(handles, list(legend), loc="lower center", ncols=min(len(legend), 4), fontsize="small")
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="sweep.json and/or bench_unlearning_step.py JSON files")
    p.add_argument("--out", default="headline.png", help="PNG to write (default headline.png)")
    args = p.parse_args(argv)
    plot_results([json.loads(Path(f).read_text()) for f in args.results], args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
