"""The diffusion half of the study (``python -m munba_kernels.drivers.study --driver diffusion``).

MUNBa against Naive (the same two losses summed, the same AdamW recipe, batches, noise and
timesteps) on the class-conditional DDPM of the diffusion driver, per unlearning seed on one
pre-trained DDPM and judge (pre-training costs ~20 minutes per seed on 2 CPU cores):

    budget     150, 300 (the driver's default), 600 steps — read off one 600-step run
    power      MUNBa's w_f/w_r = 0.5 and 2 at 300 steps (Naive has no power: its 300-step run)
    schedule   MUNBa with w_f/w_r following the forget loss (ddpm.scheduled_power_ratio)

Each model is judged like the driver does (forget recognition, retained-class accuracy,
KID on the judge's features).  A comparison reports MUNBa minus Naive per seed for
retained-class accuracy (positive: MUNBa better) and KID (negative: MUNBa better), with
wins and a paired t-test, next to both forget recognitions.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from . import diffusion
from .study import paired


@dataclass(frozen=True)
class DCell:
    name: str
    steps: int = 300
    power: float = 1.0
    schedule: str = "constant"

    def methods(self) -> tuple[str, ...]:
        return ("MUNBa",) if (self.power, self.schedule) != (1.0, "constant") else ("Naive", "MUNBa")


CELLS = (
    DCell("300 steps"),
    DCell("150 steps", steps=150),
    DCell("600 steps", steps=600),
    DCell("power 0.5", power=0.5),
    DCell("power 2", power=2.0),
    DCell("forget-loss schedule", schedule="forget-loss"),
)
METRICS = ("forget_recognition", "retain_accuracy", "feature_distance")


def _key(seed: int, row: str, cell: DCell) -> str:
    mine = row == "MUNBa"
    return json.dumps([seed, row, cell.steps, cell.power if mine else 1.0, cell.schedule if mine else "constant"])


def _baseline(cell: DCell) -> DCell:
    return DCell(cell.name, steps=cell.steps)


def study_diffusion(args, out: Path, command: str, log=print) -> dict:
    cfg = diffusion.Config(progress=False, relearn=False, dataset=args.dataset)
    if args.cache_dir:
        cfg.cache_dir = args.cache_dir
    cells, seeds = CELLS, tuple(range(args.seeds))
    if args.quick:
        cfg = diffusion.parse_args(["--dataset", "digits", "--image-size", "8", "--quick", "--ddpm-steps", "40",
                                    "--samples-per-class", "3", "--sample-steps", "4", "--no-progress",
                                    "--no-relearn", "--forget-class", "2"])  # fmt: skip
        if args.cache_dir:
            cfg.cache_dir = args.cache_dir
        cells = (DCell("4 steps", steps=4), DCell("2 steps", steps=2), DCell("power 2", steps=4, power=2.0))
        seeds = (0, 1)
    diffusion._check_classes(cfg, 10)
    path = out / "records.jsonl"
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                records[rec["key"]] = rec
    start = time.perf_counter()
    st = diffusion.setup(cfg)
    for u in seeds:
        families: dict[tuple, list[DCell]] = {}
        for cell in cells:
            families.setdefault((cell.power, cell.schedule), []).append(cell)
        for family in families.values():
            for method in dict.fromkeys(m for c in family for m in c.methods()):
                missing = [c for c in family if method in c.methods() and _key(u, method, c) not in records]
                if not missing:
                    continue
                budgets = sorted({c.steps for c in missing})
                cell = missing[0]
                recipe = diffusion.ddpm.DiffusionRecipe(
                    lr=cfg.unlearn_lr, steps=budgets[-1], power_ratio=cell.power, power_schedule=cell.schedule
                )
                run = diffusion.unlearn_method(cfg, st, method, u, recipe, snapshots=tuple(budgets[:-1]))
                for c in missing:
                    r = run if c.steps == budgets[-1] else run.snapshots[c.steps]
                    row, _ = diffusion.evaluate_generator(
                        cfg, r.model, st.judge, st.num_classes, st.real_feats, f"{method} {c.name}", u
                    )
                    rec = {"key": _key(u, method, c), "seed": u, "row": method, "cell": c.name,
                           **{m: row[m] for m in METRICS}, **diffusion.method_row(r)}  # fmt: skip
                    records[rec["key"]] = rec
                    with path.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    log(f"seed {u} {c.name:20s} {method:6s} forget {row['forget_recognition']:5.1f}% "
                        f"retain {row['retain_accuracy']:5.1f}% KID {row['feature_distance']:.3f}")  # fmt: skip
    summary = {}
    for cell in cells:
        m = [records.get(_key(u, "MUNBa", cell)) for u in seeds]
        n = [records.get(_key(u, "Naive", _baseline(cell))) for u in seeds]
        if any(r is None for r in m + n):
            continue
        entry = {"steps": cell.steps, "power": cell.power, "schedule": cell.schedule, "rows": {}, "pairs": {}}
        for name, recs in (("Naive", n), ("MUNBa", m)):
            entry["rows"][name] = {
                k: {"mean": statistics.fmean(r[k] for r in recs),
                    "std": statistics.stdev(r[k] for r in recs) if len(recs) > 1 else 0.0,
                    "per_seed": [r[k] for r in recs]}
                for k in METRICS
            }  # fmt: skip
        acc = paired([r["retain_accuracy"] for r in m], [r["retain_accuracy"] for r in n])
        acc["wins"] = sum(d > 0 for d in acc["diff"])  # higher accuracy is better
        entry["pairs"]["retain_accuracy"] = acc
        entry["pairs"]["feature_distance"] = paired([r["feature_distance"] for r in m], [r["feature_distance"] for r in n])
        entry["pairs"]["forget_recognition"] = paired(
            [r["forget_recognition"] for r in m], [r["forget_recognition"] for r in n]
        )
        summary[cell.name] = entry
    report = {"command": command, "seeds": list(seeds), "ddpm_seed": cfg.seed, "summary": summary,
              "config": {k: v for k, v in vars(cfg).items() if k != "progress"},
              "seconds": time.perf_counter() - start}  # fmt: skip
    (out / "study.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "study.md").write_text(_markdown(report, command))
    _plot(summary, out / "study.png")
    return report


def _ms(d: dict, digits: int = 2) -> str:
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def _pair(p: dict, digits: int = 2) -> str:
    pv = "" if p["p"] is None else f", p={p['p']:.2f}"
    return f"{p['mean']:+.{digits}f} ± {p['std']:.{digits}f} ({p['wins']}/{p['n']}{pv})"


def _markdown(report: dict, command: str) -> str:
    seeds = ", ".join(map(str, report["seeds"]))
    lines = ["# MUNBa vs Naive: class-conditional DDPM, erase one class", "", f"Command: `{command}`", "",
             f"Unlearning seeds {seeds} on one pre-trained DDPM and judge (seed {report['ddpm_seed']}); mean ± std.",
             "Δ = MUNBa − Naive per seed, mean ± std (MUNBa wins/seeds, paired t-test p): retained accuracy ↑ "
             "(a win is a higher value), KID ↓ (a win is a lower value). Power and schedule cells compare with "
             "Naive at the same steps.", "",
             "| cell | forget rec. Naive | forget rec. MUNBa | retain acc. Naive | retain acc. MUNBa | Δ retain acc. "
             "| KID Naive | KID MUNBa | Δ KID |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, e in report["summary"].items():
        r, p = e["rows"], e["pairs"]
        lines.append(
            f"| {name} | {_ms(r['Naive']['forget_recognition'], 1)} | {_ms(r['MUNBa']['forget_recognition'], 1)} "
            f"| {_ms(r['Naive']['retain_accuracy'], 1)} | {_ms(r['MUNBa']['retain_accuracy'], 1)} "
            f"| {_pair(p['retain_accuracy'], 1)} | {_ms(r['Naive']['feature_distance'], 3)} "
            f"| {_ms(r['MUNBa']['feature_distance'], 3)} | {_pair(p['feature_distance'], 3)} |"
        )
    return "\n".join(lines) + "\n"


def _plot(summary: dict, path: Path) -> None:
    from munba_kernels.evaluation.report import _pyplot

    plt = _pyplot()
    names = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, label in zip(axes, METRICS, ("forget recognition % ↓", "retained-class accuracy % ↑", "KID ↓")):
        for i, row in enumerate(("Naive", "MUNBa")):
            vals = [summary[n]["rows"][row][metric] for n in names]
            ax.bar([j + 0.4 * i for j in range(len(names))], [v["mean"] for v in vals], 0.4,
                   yerr=[v["std"] for v in vals], capsize=2, label=row)  # fmt: skip
        ax.set_xticks([j + 0.2 for j in range(len(names))], names, rotation=25, fontsize="small")
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("MUNBa vs Naive, class-conditional DDPM (mean ± std over unlearning seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
