"""Where does bargaining pay off?  A controlled study of MUNBa against its naive counterparts.

    python -m munba_kernels.drivers.study --driver classify --out benchmarks/results/study-classify
    python -m munba_kernels.drivers.study --driver diffusion --out benchmarks/results/study-diffusion
    python -m munba_kernels.drivers.study --driver classify --quick --out /tmp/study   # seconds, digits

Classification.  One lever at a time around the published recipe ("paper": 2 epochs, every
method's direction clipped to norm 1, equal bargaining power): the budget (5 and 10
epochs), the clip (off, for every method), and MUNBa's bargaining power w_f/w_r (0.5, 2, 4;
a sum has no power, so those cells compare with the paper cell's baselines).  Each cell
runs the two pairs that isolate bargaining, with the same losses, optimizer, clip, budget,
batches, learning-rate grid and selection rule as the driver (classify.run_method: every
grid point, the point with the smallest *validation* Avg. Gap, its *test* numbers):

    random-label forget loss   Naive     vs MUNBa
    gradient-ascent loss       NegGrad+  vs MUNBa-GA   (NegGrad+ also searches β; the row
                                                        "NegGrad+ β=0.9" is its equal budget)

and MUNBa is also compared with NegGrad+, the strongest baseline.  Per scenario and seed
the test Avg. Gap of each is recorded; a comparison reports the mean ± std over seeds of
MUNBa's gap minus the baseline's (negative: MUNBa closer to Retrain), on how many seeds MUNBa
wins, and a paired t-test (scipy; with 3 seeds it has little power, so read the win count).

Recommended recipe.  Among the MUNBa cells, the candidate is the one with the smallest mean
*validation* gap on the selection scenario (random, seeds 0–2).  It is confirmed only if it
also beats its naive counterpart and NegGrad+ (same lever settings) on the test gap on most
of seeds 3–5 in every held-out scenario (class, hard).

Diffusion.  MUNBa vs Naive on the class-conditional DDPM (no learning-rate grid in that
driver: both run at its fixed rate), per seed (each seed pre-trains its own DDPM and judge):
the budget (150/300/600 steps), MUNBa's power (0.5, 2), and the forget-loss power schedule.
Compared: forget recognition, retained-class accuracy and KID.

Records go to OUT/records.jsonl as they arrive (a rerun skips what is there, so a stopped
study resumes), and the report to OUT/study.md, OUT/study.json and OUT/study.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import classify, options
from . import data as datasets

PAIRS = (
    # (MUNBa variant, its naive counterpart: same losses, same clip and budget)
    ("MUNBa", "Naive"),
    ("MUNBa-GA", "NegGrad+"),
    ("MUNBa-GA", classify.EQUAL_BUDGET_ROW),
    ("MUNBa", "NegGrad+"),
)
BASELINES = ("Naive", "NegGrad+")
MUNBA_VARIANTS = ("MUNBa", "MUNBa-GA")


@dataclass(frozen=True)
class Cell:
    """One setting of the levers; ``power`` applies to the MUNBa variants only."""

    name: str
    lever: str
    epochs: int = 2
    clip: float | None = 1.0
    power: float = 1.0

    def methods(self) -> tuple[str, ...]:
        return MUNBA_VARIANTS if self.power != 1.0 else (*BASELINES, *MUNBA_VARIANTS)

    def baseline_cell(self) -> Cell:
        """Where this cell's baselines live: a sum has no power, so a power cell's baselines
        are those of the same budget and clip at equal power."""
        return self if self.power == 1.0 else replace(self, name=f"{self.name} (baselines)", power=1.0)


PAPER = Cell("paper", "paper")
CELLS = (
    PAPER,
    Cell("no clip", "clip", clip=None),
    Cell("5 epochs", "budget", epochs=5),
    Cell("power 0.5", "power", power=0.5),
    Cell("power 2", "power", power=2.0),
    Cell("power 4", "power", power=4.0),
    Cell("10 epochs", "budget", epochs=10),
)


@dataclass
class Plan:
    scenarios: tuple[str, ...] = ("random", "hard", "class")  # in the order they run
    sweep_scenarios: tuple[str, ...] = ("random",)  # the others get the paper cell only
    selection_scenario: str = "random"
    confirm_scenarios: tuple[str, ...] = ("class",)
    seeds: tuple[int, ...] = (0, 1, 2)
    confirm_seeds: tuple[int, ...] = (3, 4, 5)
    cells: tuple[Cell, ...] = CELLS  # the first is the reference every scenario runs
    base: classify.Config = field(default_factory=classify.Config)

    @property
    def paper(self) -> Cell:
        return self.cells[0]

    def cells_for(self, scenario: str) -> tuple[Cell, ...]:
        return self.cells if scenario in self.sweep_scenarios else (self.paper,)


# ------------------------------------------------------------------------------ records


class Records:
    """Append-only JSON lines keyed by (scenario, seed, row, epochs, clip, power)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.rows[rec["key"]] = rec

    @staticmethod
    def key(scenario: str, seed: int, row: str, cell: Cell) -> str:
        power = cell.power if row in MUNBA_VARIANTS else 1.0
        return json.dumps([scenario, seed, row, cell.epochs, cell.clip, power])

    def get(self, scenario, seed, row, cell) -> dict | None:
        return self.rows.get(self.key(scenario, seed, row, cell))

    def add(self, scenario, seed, row, cell, values: dict) -> None:
        rec = {"key": self.key(scenario, seed, row, cell), "scenario": scenario, "seed": seed, "row": row,
               "epochs": cell.epochs, "clip": cell.clip, "power": cell.power if row in MUNBA_VARIANTS else 1.0,
               **values}  # fmt: skip
        self.rows[rec["key"]] = rec
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


_KEPT = ("UA", "RA", "TA", "MIA", "avg_gap", "val_gap", "lr", "beta", "seconds", "clipped_steps", "settings")
#: Config entries a driver run must share with the study's base to stand in for its first cell.
_MATCH = ("dataset", "model", "train_size", "test_size", "batch_size", "pretrain_epochs", "pretrain_lr",
          "forget_ratio", "forget_classes", "recipe", "lr_grid", "neggrad_betas")  # fmt: skip


def import_driver_results(plan: Plan, records: Records, path: Path, log=print) -> None:
    """Record a classify driver run (results.json, same configuration as the study's first
    cell) as that cell's rows, so the study need not recompute what the README tables ran."""
    saved = json.loads(Path(path).read_text())
    cfg = saved["config"]
    base = json.loads(json.dumps(_plan_dict(plan)["base"]))
    model = base["model"] or cfg["model"]
    diffs = [k for k in _MATCH if (cfg[k] if k != "model" else cfg["model"]) != (base[k] if k != "model" else model)]
    cell = plan.paper
    if (cfg["epochs"], cfg["max_grad_norm"], cfg["power"]) != (cell.epochs, cell.clip, cell.power):
        diffs.append("epochs/max_grad_norm/power")
    if diffs:
        raise ValueError(f"{path}: differs from the study's configuration in {diffs}")
    rows = (*BASELINES, classify.EQUAL_BUDGET_ROW, *MUNBA_VARIANTS)
    for seed in range(cfg["seeds"]):
        for row in rows:
            if row in saved["methods"] and not records.get(cfg["scenario"], seed, row, cell):
                values = saved["methods"][row]["per_seed"][seed]
                records.add(cfg["scenario"], seed, row, cell, {k: values.get(k) for k in _KEPT} | {"imported": str(path)})
    log(f"imported {path} as {cfg['scenario']} '{cell.name}', seeds 0..{cfg['seeds'] - 1}")


def run_classify_cells(plan: Plan, records: Records, scenario: str, seed: int, cells, contexts, ds, log):
    """Run whatever these cells still lack for (scenario, seed); rows land in ``records``.

    Cells that differ only in their budget share one run per grid point: the longest, with
    snapshots at the shorter budgets (``unlearn(snapshots=...)``: exactly the shorter runs)."""
    families: dict[tuple, list[Cell]] = {}
    for cell in cells:
        families.setdefault((cell.clip, cell.power), []).append(cell)
    for family in families.values():
        for method in dict.fromkeys(m for c in family for m in c.methods()):
            rows = [method, classify.EQUAL_BUDGET_ROW] if method == "NegGrad+" else [method]
            missing = [c for c in family if method in c.methods() and not all(records.get(scenario, seed, r, c) for r in rows)]
            if not missing:
                continue
            budgets = sorted({c.epochs for c in missing})
            cfg = cell_config(plan.base, scenario, replace(missing[0], epochs=budgets[-1]))
            if (scenario, seed) not in contexts:
                contexts[(scenario, seed)] = classify.prepare_seed(cfg, ds, seed)
            start = time.perf_counter()
            by_epochs, _ = classify.run_method(cfg, contexts[(scenario, seed)], method, seed, log=lambda *_: None,
                                               snapshots=tuple(budgets[:-1]))  # fmt: skip
            for cell in missing:
                out = by_epochs[cell.epochs]
                for row in rows:
                    if row in out:
                        records.add(scenario, seed, row, cell, {k: out[row].get(k) for k in _KEPT})
                log(f"{scenario:6s} seed {seed} {cell.name:10s} {method:8s} test gap {out[method]['avg_gap']:5.2f} "
                    f"(val {out[method]['val_gap']:5.2f}, lr {out[method]['lr']:g})")  # fmt: skip
            log(f"    ({time.perf_counter() - start:.0f}s for {method} up to {budgets[-1]} epochs)")


def cell_config(base: classify.Config, scenario: str, cell: Cell) -> classify.Config:
    cfg = copy.deepcopy(base)
    cfg.scenario, cfg.epochs, cfg.max_grad_norm, cfg.power = scenario, cell.epochs, cell.clip, cell.power
    cfg.relearn, cfg.progress = False, False
    return cfg


# ------------------------------------------------------------------------------ analysis


def paired(munba: list[float], baseline: list[float]) -> dict:
    """MUNBa minus baseline per seed (negative: MUNBa closer to Retrain), wins, paired t-test."""
    from scipy import stats

    diff = [m - b for m, b in zip(munba, baseline)]
    out = {
        "diff": diff,
        "mean": statistics.fmean(diff),
        "std": statistics.stdev(diff) if len(diff) > 1 else 0.0,
        "wins": sum(d < 0 for d in diff),
        "n": len(diff),
        "p": None,
    }
    if len(diff) > 1 and any(d != diff[0] for d in diff):
        out["p"] = float(stats.ttest_rel(munba, baseline).pvalue)
    return out


def gaps(records: Records, scenario: str, seeds, row: str, cell: Cell, metric: str = "avg_gap"):
    """Per-seed values, or None while any seed is missing."""
    where = cell if row in MUNBA_VARIANTS else cell.baseline_cell()
    values = [records.get(scenario, s, row, where) for s in seeds]
    return None if any(v is None for v in values) else [v[metric] for v in values]


def summarise(plan: Plan, records: Records) -> dict:
    """Per scenario and cell: mean ± std of every row's test gap and the paired comparisons."""
    out = {}
    for scenario in plan.scenarios:
        out[scenario] = {}
        for cell in plan.cells_for(scenario):
            entry = {"rows": {}, "pairs": {}}
            for row in (*BASELINES, classify.EQUAL_BUDGET_ROW, *MUNBA_VARIANTS):
                g = gaps(records, scenario, plan.seeds, row, cell)
                if g is not None:
                    entry["rows"][row] = _mean_std(g)
                    for metric in ("UA", "RA", "TA", "MIA", "val_gap"):
                        entry["rows"][row][metric] = _mean_std(gaps(records, scenario, plan.seeds, row, cell, metric))
            for munba, base in PAIRS:
                a, b = gaps(records, scenario, plan.seeds, munba, cell), gaps(records, scenario, plan.seeds, base, cell)
                if a is not None and b is not None:
                    entry["pairs"][f"{munba} vs {base}"] = paired(a, b)
            if entry["rows"]:
                out[scenario][cell.name] = entry
    return out


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}  # fmt: skip


def candidate(plan: Plan, records: Records) -> tuple[str, Cell] | None:
    """The MUNBa variant and cell with the smallest mean validation gap on the selection scenario."""
    best = None
    for cell in plan.cells:
        for row in MUNBA_VARIANTS:
            v = gaps(records, plan.selection_scenario, plan.seeds, row, cell, "val_gap")
            if v is not None and (best is None or statistics.fmean(v) < best[0]):
                best = (statistics.fmean(v), row, cell)
    return None if best is None else (best[1], best[2])


def head_to_head(records: Records, scenario: str, seeds, row: str, cell: Cell) -> dict[str, dict]:
    """``row`` at ``cell`` against its naive counterpart and NegGrad+ (test gaps, paired)."""
    counterpart = "Naive" if row == "MUNBa" else "NegGrad+"
    res = {}
    for base in dict.fromkeys((counterpart, "NegGrad+")):
        a, b = gaps(records, scenario, seeds, row, cell), gaps(records, scenario, seeds, base, cell)
        if a is not None and b is not None:
            res[base] = paired(a, b)
    return res


def _majority(res: dict[str, dict], n: int) -> bool:
    return len(res) > 0 and all(r["wins"] >= n // 2 + 1 for r in res.values())


def confirm(plan: Plan, records: Records, row: str, cell: Cell) -> dict:
    """The candidate must first beat its naive counterpart and NegGrad+ on most seeds of the
    selection scenario (test gap), then do so again on held-out seeds of held-out scenarios."""
    selection = head_to_head(records, plan.selection_scenario, plan.seeds, row, cell)
    out = {s: head_to_head(records, s, plan.confirm_seeds, row, cell) for s in plan.confirm_scenarios}
    won_selection = _majority(selection, len(plan.seeds))
    decided = not won_selection or all(out.values())
    confirmed = won_selection and all(_majority(r, len(plan.confirm_seeds)) for r in out.values())
    return {"row": row, "cell": cell.name, "selection": selection, "won_selection": won_selection,
            "scenarios": out, "confirmed": bool(confirmed), "complete": bool(decided)}  # fmt: skip


# ------------------------------------------------------------------------------ report


def _fmt(ms: dict | None) -> str:
    return "–" if ms is None else f"{ms['mean']:.2f} ± {ms['std']:.2f}"


def _fmt_pair(p: dict | None) -> str:
    if p is None:
        return "–"
    pv = "" if p["p"] is None else f", p={p['p']:.2f}"
    return f"{p['mean']:+.2f} ± {p['std']:.2f} ({p['wins']}/{p['n']}{pv})"


def markdown(plan: Plan, summary: dict, cand, confirmation, title: str, command: str) -> str:
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             "Test Avg. Gap to Retrain (↓), mean ± std over seeds "
             f"{', '.join(map(str, plan.seeds))}; every entry is the grid point with the smallest validation gap.",
             "Comparisons: MUNBa's gap minus the baseline's per seed, mean ± std (MUNBa wins/seeds, paired t-test p);",
             "negative means MUNBa is closer to Retrain. Power cells compare with the paper cell's baselines.", ""]  # fmt: skip
    cols = ["Naive", "MUNBa", "MUNBa vs Naive", "NegGrad+", "NegGrad+ β=0.9", "MUNBa-GA",
            "MUNBa-GA vs NegGrad+", "MUNBa-GA vs NegGrad+ β=0.9", "MUNBa vs NegGrad+"]  # fmt: skip
    for scenario, cells in summary.items():
        lines += [f"## {scenario}", "", "| cell | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for name, entry in cells.items():
            r, p = entry["rows"], entry["pairs"]
            cells_ = [_fmt(r.get("Naive")), _fmt(r.get("MUNBa")), _fmt_pair(p.get("MUNBa vs Naive")),
                      _fmt(r.get("NegGrad+")), _fmt(r.get(classify.EQUAL_BUDGET_ROW)), _fmt(r.get("MUNBa-GA")),
                      _fmt_pair(p.get("MUNBa-GA vs NegGrad+")),
                      _fmt_pair(p.get(f"MUNBa-GA vs {classify.EQUAL_BUDGET_ROW}")),
                      _fmt_pair(p.get("MUNBa vs NegGrad+"))]  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(cells_) + " |")
        lines.append("")
        paper = cells.get(plan.paper.name)
        if paper:
            lines += ["UA / RA / TA / MIA at the paper cell (test, mean over seeds):", ""]
            lines += ["| row | UA | RA | TA | MIA |", "|---|---:|---:|---:|---:|"]
            for row, v in paper["rows"].items():
                lines.append(f"| {row} | " + " | ".join(f"{v[m]['mean']:.2f}" for m in ("UA", "RA", "TA", "MIA")) + " |")
            lines.append("")
    if cand is not None:
        lines += ["## Recommended-recipe check", "",
                  f"Candidate (smallest mean validation gap on {plan.selection_scenario}, seeds "
                  f"{', '.join(map(str, plan.seeds))}): **{cand[0]} at '{cand[1].name}'**.", ""]  # fmt: skip
        if confirmation:
            for base, pr in confirmation["selection"].items():
                lines.append(f"* {plan.selection_scenario}, seeds {', '.join(map(str, plan.seeds))} (where it was "
                             f"chosen): {cand[0]} vs {base} {_fmt_pair(pr)}")  # fmt: skip
            for scenario, res in confirmation["scenarios"].items():
                for base, pr in res.items():
                    lines.append(f"* {scenario}, seeds {', '.join(map(str, plan.confirm_seeds))}: "
                                 f"{cand[0]} vs {base} {_fmt_pair(pr)}")  # fmt: skip
            if confirmation["confirmed"]:
                verdict = "confirmed: it wins on most held-out seeds in every held-out scenario"
            elif not confirmation["won_selection"]:
                verdict = ("not a recommendation: it does not beat both baselines on most seeds even where it "
                           "was chosen, so no held-out check was run and the paper recipe stays")  # fmt: skip
            else:
                verdict = "not confirmed" + ("" if confirmation["complete"] else " (confirmation incomplete)")
            lines += ["", f"Verdict: {verdict}.", ""]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    """Per scenario: test gap (mean ± std) per cell for the four rows, grouped bars."""
    from munba_kernels.evaluation.report import _pyplot

    plt = _pyplot()
    rows = ("Naive", "MUNBa", "NegGrad+", "MUNBa-GA")
    fig, axes = plt.subplots(len(summary), 1, figsize=(12, 3.6 * len(summary)), squeeze=False)
    for ax, (scenario, cells) in zip(axes[:, 0], summary.items()):
        names = list(cells)
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            ms = [cells[n]["rows"].get(row) for n in names]
            xs = [j + i * width for j in range(len(names))]
            ax.bar(xs, [m["mean"] if m else float("nan") for m in ms], width,
                   yerr=[m["std"] if m else 0 for m in ms], capsize=2, label=row)  # fmt: skip
        ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(names))], names)
        ax.set_ylabel("test Avg. Gap ↓")
        ax.set_title(f"{scenario}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(ncols=len(rows), fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ drivers


def study_classify(plan: Plan, out: Path, command: str, log=print) -> dict:
    records = Records(out / "records.jsonl")
    ds = datasets.load_dataset(plan.base.dataset, plan.base.data_dir)
    if plan.base.model is None:
        plan.base.model = "resnet18" if ds.image_shape[1] >= 32 else "narrow_resnet"
    contexts: dict = {}
    start = time.perf_counter()
    for scenario in plan.scenarios:
        for seed in plan.seeds:
            run_classify_cells(plan, records, scenario, seed, plan.cells_for(scenario), contexts, ds, log)
            contexts.pop((scenario, seed), None)
    cand = candidate(plan, records)
    confirmation = None
    if cand is not None and plan.confirm_seeds:
        row, cell = cand
        if _majority(head_to_head(records, plan.selection_scenario, plan.seeds, row, cell), len(plan.seeds)):
            for scenario in plan.confirm_scenarios:
                for seed in plan.confirm_seeds:
                    cells = tuple(dict.fromkeys((cell, cell.baseline_cell())))
                    run_classify_cells(plan, records, scenario, seed, cells, contexts, ds, log)
                    contexts.pop((scenario, seed), None)
        confirmation = confirm(plan, records, row, cell)
    summary = summarise(plan, records)
    title = f"MUNBa vs its naive counterparts: {plan.base.dataset}, classification"
    report = {"command": command, "plan": _plan_dict(plan), "summary": summary,
              "candidate": None if cand is None else {"row": cand[0], "cell": cand[1].name},
              "confirmation": confirmation, "seconds": time.perf_counter() - start}  # fmt: skip
    (out / "study.json").write_text(json.dumps(report, indent=2))
    (out / "study.md").write_text(markdown(plan, summary, cand, confirmation, title, command))
    plot(summary, out / "study.png", title)
    return report


def _plan_dict(plan: Plan) -> dict:
    from dataclasses import asdict

    d = asdict(plan)
    d["base"] = {k: v for k, v in d["base"].items() if k not in ("progress",)}
    return d


def parse_args(argv: list[str] | None = None):
    """The command line; a bad value exits through ``parser.error`` (one line, code 2)."""
    p = argparse.ArgumentParser(
        prog="python -m munba_kernels.drivers.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--driver", choices=("classify", "diffusion"), default="classify")
    p.add_argument("--out", required=True)
    p.add_argument("--dataset", choices=datasets.DATASETS, default="fashion_mnist")
    p.add_argument("--seeds", type=options.positive_int, default=3, help="seeds 0..N-1 for the sweep")

    def scenarios(flag: str, default, help: str) -> None:
        p.add_argument(flag, nargs="+", choices=classify.SCENARIOS, default=list(default), help=help)

    scenarios("--scenarios", Plan.scenarios, "classification scenarios, in the order they run (the levers are swept on random)")
    p.add_argument(
        "--confirm-seeds",
        type=options.int_at_least(0),
        default=3,
        help="held-out seeds N..N+M-1 for the recipe check",
    )
    scenarios("--confirm-scenarios", Plan.confirm_scenarios, "held-out scenarios the recommended-recipe candidate must also win on")
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--import",
        dest="imports",
        nargs="+",
        default=[],
        help="classify results.json files (same configuration) to record as the paper cell",
    )
    p.add_argument("--quick", action="store_true", help="seconds: digits, tiny budgets, three cells, two seeds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m munba_kernels.drivers.study " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.driver == "diffusion":
        from .study_diffusion import study_diffusion

        return study_diffusion(a, out, command)
    base = classify.Config(dataset=a.dataset, progress=False)
    if a.cache_dir:
        base.cache_dir = a.cache_dir
    plan = Plan(base=base, seeds=tuple(range(a.seeds)), scenarios=tuple(a.scenarios),
                confirm_seeds=tuple(range(a.seeds, a.seeds + a.confirm_seeds)))  # fmt: skip
    plan.confirm_scenarios = tuple(s for s in a.confirm_scenarios if s != plan.selection_scenario)
    if a.quick:
        base.dataset, base.train_size, base.test_size, base.pretrain_epochs = "digits", 600, 300, 3
        base.lr_grid, base.neggrad_betas = [0.01], [0.5, classify.NEGGRAD_BETA]
        plan.scenarios, plan.sweep_scenarios, plan.confirm_scenarios = ("random", "hard"), ("random",), ("hard",)
        plan.cells = (replace(PAPER, epochs=1), Cell("2 epochs", "budget", epochs=2),
                      Cell("power 2", "power", epochs=1, power=2.0))  # fmt: skip
        plan.seeds, plan.confirm_seeds = (0, 1), (2,)
    records = Records(out / "records.jsonl")
    for path in a.imports:
        import_driver_results(plan, records, Path(path))
    return study_classify(plan, out, command)


if __name__ == "__main__":
    main()
