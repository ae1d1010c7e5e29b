"""Markdown tables and PNG plots of driver results (``results.json``-shaped dictionaries)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def markdown_table(methods: dict[str, dict], columns: Sequence[str], title: str = "") -> str:
    """One row per method; numbers with two decimals, missing values as '–'; a row's
    ``std`` entry (a dict by column) is shown as ``mean ± std``."""
    lines = [f"### {title}", ""] if title else []
    lines.append("| method | " + " | ".join(columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    for name, row in methods.items():
        cells = []
        std = row.get("std") or {}
        for col in columns:
            value = row.get(col)
            cell = "–" if value is None else _fmt(value)
            if col in std and value is not None:
                cell += f" ± {_fmt(float(std[col]))}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(
    methods: dict[str, dict],
    metrics: Sequence[str],
    path: str | Path,
    title: str = "",
    ylabel: str = "%",
    ylim: tuple[float, float] = (0, 125),
) -> None:
    """Grouped bars of ``metrics`` per method, plus a panel of run time when present."""
    plt = _pyplot()
    names = list(methods)
    has_time = any("seconds" in methods[n] for n in names)
    fig, axes = plt.subplots(
        1,
        2 if has_time else 1,
        figsize=(12 if has_time else 8, 4),
        gridspec_kw={"width_ratios": [3, 1]} if has_time else None,
        squeeze=False,
    )
    ax = axes[0][0]
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        values = [methods[n].get(metric, float("nan")) for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=metric)
    ax.set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(names))], names, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)  # headroom so the legend never covers a bar
    ax.legend(ncols=len(metrics), fontsize="small", loc="upper center")
    ax.set_title(title)
    if has_time:
        tax = axes[0][1]
        tax.bar(names, [methods[n].get("seconds", float("nan")) for n in names], color="grey")
        tax.set_ylabel("seconds")
        tax.tick_params(axis="x", rotation=60)
        tax.set_title("run time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bargain_trace(
    log: Sequence[Sequence[float]], path: str | Path, title: str = "MUNBa", players: Sequence[str] | None = None
) -> None:
    """α per player (log scale) and cos φ per pair of players, per step of one MUNBa run.

    A row holds K α's then the K(K−1)/2 pair cosines (i < j): (α_f, α_r, cos φ) for two
    players.  ``players`` names them (default: forget and preserve for two, else numbers).
    """
    plt = _pyplot()
    steps = range(len(log))
    width = len(log[0]) if log else 3
    k = round((math.sqrt(8 * width + 1) - 1) / 2)  # width = K(K+1)/2
    if k * (k + 1) // 2 != width or (players is not None and len(players) != k):
        raise ValueError(f"a bargain trace row of {width} entries does not fit {players or 'K'} players")
    cols = list(zip(*log)) if log else [()] * width
    if k == 2 and players is None:
        labels, pairs = ["α_f (forget)", "α_r (preserve)"], ["cos φ(g_f, g_r)"]
    else:
        names = list(players) if players is not None else [str(i) for i in range(k)]
        labels = [f"α {n}" for n in names]
        pairs = [f"cos({a}, {b})" for i, a in enumerate(names) for b in names[i + 1 :]]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for col, label in zip(cols[:k], labels):
        ax1.semilogy(steps, col, label=label)
    ax1.set_ylabel("bargaining weight")
    ax1.legend()
    ax1.set_title(title)
    for col, label in zip(cols[k:], pairs):
        ax2.plot(steps, col, color="tab:green" if len(pairs) == 1 else None, label=label)
    ax2.axhline(0.0, color="grey", lw=0.5)
    if len(pairs) == 1:
        ax2.set_ylabel(pairs[0])
    else:
        ax2.set_ylabel("cos φ per pair")
        ax2.legend(fontsize="x-small", ncol=2)
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_relearn(
    relearn: dict[str, dict],
    path: str | Path,
    title: str = "",
    ylabel: str = "accuracy on the rest of the forget set (%)",
) -> None:
    """Forget accuracy recovered by the relearning attack: one panel per slice size, one
    line per model (mean over seeds, ± std band); Retrain, the reference, in black."""
    plt = _pyplot()
    fracs = list(next(iter(relearn.values())))
    fig, axes = plt.subplots(1, len(fracs), figsize=(5.5 * len(fracs), 4), squeeze=False, sharey=True)
    for ax, frac in zip(axes[0], fracs):
        for name, curves in relearn.items():
            c = curves[frac]
            mean, std = c["forget_acc"], c.get("std", [0.0] * len(c["steps"]))
            style = {"color": "black", "lw": 2.5, "ls": "--"} if name == "Retrain" else {}
            (line,) = ax.plot(c["steps"], mean, marker="o", ms=3, label=name, **style)
            ax.fill_between(
                c["steps"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                color=line.get_color(), alpha=0.12,
            )  # fmt: skip
        ax.set_title(f"relearning on {frac}" + (" of the forget set" if frac.endswith("%") else ""))
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tradeoff(curves: dict, chosen: dict, path: str | Path, title: str = "") -> None:
    """Model utility against forget quality along training, one line per method: its chosen learning
    rate bold, the other rates of its grid faint.  ``curves[method][lr]`` = ``[{"step",
    "forget_quality", "model_utility"}, ...]`` (forget quality on a log axis)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, by_lr) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        for lr, points in by_lr.items():
            xs = [max(p["forget_quality"] or 0.0, 1e-12) for p in points]
            ys = [p["model_utility"] for p in points]
            bold = lr == chosen.get(method)
            ax.plot(xs, ys, "-o", color=colour, alpha=1.0 if bold else 0.25, lw=2 if bold else 1, ms=4 if bold else 2,
                    label=f"{method} (lr {lr:g})" if bold else None)  # fmt: skip
            ax.annotate("end", (xs[-1], ys[-1]), fontsize=6, color=colour, alpha=0.8 if bold else 0.0)
    ax.set_xscale("log")
    ax.axvline(0.05, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("forget quality (KS p-value vs retain model, log)")
    ax.set_ylabel("model utility")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
