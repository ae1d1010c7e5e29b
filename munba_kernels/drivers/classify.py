"""Classification unlearning: MUNBa and the baselines side by side, evaluated against Retrain.

    python -m munba_kernels.drivers.classify --dataset fashion_mnist --scenario random \\
        --forget-ratio 0.1 --methods all --seeds 1 --epochs 2 --device cpu --out runs/fmnist

Per seed: train the original model on the training set and Retrain on the retain set
(both cached, keyed by their configuration), run every method for every point of its grid
from the same original, pick each method's point by the selection rule below, and evaluate
UA, RA, TA, MIA-Efficacy, Avg. Gap to Retrain, run time, the representation checks and a
relearning attack.  Writes ``results.json``, ``results.md`` and PNG plots to --out.

Fairness: every method's optimizer comes from one recipe (``--recipe paper``: SGD, momentum
0.9, weight decay 5e-4, the direction's norm clipped to 1, as published for MUNBa; override
with --max-grad-norm, --epochs, --power), so Naive, NegGrad+, MUNBa and MUNBa-GA share the
base rule, clip, budget, data order, learning-rate grid and selection rule.  results.json
records, per method, the settings read back from the optimizer that ran.

Selection (fixed in advance, identical for every method): the test set is split in two
fixed halves.  For each grid point (learning rate; for NegGrad+ also β) the Avg. Gap to
Retrain is computed with TA and the MIA's non-member set taken from the *validation* half;
the point with the smallest validation gap wins (ties: the first, i.e. the smaller rate).
Reported numbers use the other half.  NegGrad+ searches 3 β × 3 rates, three times the
points of MUNBa-GA; the row "NegGrad+ β=0.9" is the same runs restricted to the hand-set
β = 0.9, an equal-budget comparison.

Several forget classes (``--scenario class --forget-classes 3 5 7``): every row also reports
each class's UA (``UA[c]``) and their spread (max − min), which shows whether one class stays
un-forgotten.  ``--players per-class`` adds, for each MUNBa method, a row that bargains one
forget player per class plus the preserve player ("MUNBa per-class") beside the two-player
run with the classes merged, on the same batches, random labels, grid and budget.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from munba_kernels.evaluation import accuracy, avg_gap, knn_probe_accuracy, linear_cka, penultimate_features
from munba_kernels.evaluation.metrics import GAP_METRICS, unlearning_metrics
from munba_kernels.evaluation.report import markdown_table, plot_bargain_trace, plot_metric_bars, plot_relearn

from . import data as datasets
from . import options, parallel, robustness
from .cache import cache_path, default_cache_dir, fingerprint, load_entry, save_atomic
from .models import MODELS, build_model, classifier_head
from .unlearning import METHODS, NEGGRAD_BETA, PAPER, Recipe, Subset, predict, train_classifier, unlearn

# One grid for every SGD-based method (GA, which diverges at those rates, sits one step
# lower); the same grid and the same selection rule (module docstring) for every method.
_SGD_GRID = (0.003, 0.01, 0.03)
LR_GRID = {
    "FT": _SGD_GRID,
    "GA": (3e-4, 1e-3, 3e-3),
    "RL": _SGD_GRID,
    "NegGrad+": _SGD_GRID,
    "Naive": _SGD_GRID,
    "MUNBa": _SGD_GRID,
    "MUNBa-GA": _SGD_GRID,
}
#: NegGrad+'s retain weight β: equal weights (the plain sum, halved), the usual 0.9, and 0.99.
NEGGRAD_BETAS = (0.5, NEGGRAD_BETA, 0.99)
#: Named optimizer recipes (--recipe); "paper" is MUNBa's published classification recipe.
RECIPES = {"paper": PAPER}
SCENARIOS = ("class", "random", "hard")
#: --players: one forget player for the whole forget set, or one per forget class (K = classes + 1).
PLAYERS = ("merged", "per-class")
PER_CLASS = " per-class"  # the row-name suffix of a per-class run
#: Part of every cache key: bump it when training code changes so stale models are not reused.
CACHE_VERSION = 2  # 2: the original trains on the training subset in its fixed order
REPORT_COLUMNS = (
    "UA", "RA", "TA", "MIA", "avg_gap", "probe_forget", "cka_to_retrain", "relearn 5%", "relearn 10%",
    "seconds", "lr", "beta",
)  # fmt: skip


@dataclass
class Config:
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    model: str | None = None
    scenario: str = "random"
    forget_classes: list[int] = field(default_factory=lambda: [3])
    forget_ratio: float = 0.1
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: int = 1
    epochs: int = 2
    pretrain_epochs: int = 8
    pretrain_lr: float = 0.05
    train_size: int = 10000
    test_size: int = 4000
    batch_size: int = 128
    device: str = "cpu"
    out: str = "runs/classify"
    cache_dir: str = field(default_factory=default_cache_dir)
    quick: bool = False
    progress: bool = True
    distributed: str | None = None
    recipe: str = "paper"
    max_grad_norm: float | None = PAPER.max_grad_norm
    power: float = PAPER.power_ratio
    neggrad_betas: list[float] = field(default_factory=lambda: list(NEGGRAD_BETAS))
    lr_grid: list[float] | None = None  # None: LR_GRID; else one grid for every method but GA
    relearn: bool = True
    relearn_steps: int = robustness.RelearnAttack.steps
    relearn_lr: float = robustness.RelearnAttack.lr
    relearn_fractions: list[float] = field(default_factory=lambda: list(robustness.RelearnAttack.fractions))
    players: str = "merged"

    def per_class_groups(self) -> bool:
        """Several forget classes, each reported on its own (the ``UA[c]`` columns)."""
        return self.scenario == "class" and len(self.forget_classes) > 1

    def runs(self) -> list[tuple[str, str, bool]]:
        """(row name, method, one player per class?) of every unlearning run, in order."""
        out = []
        for m in self.methods:
            out.append((m, m, False))
            if self.players == "per-class" and m.startswith("MUNBa"):
                out.append((m + PER_CLASS, m, True))
        return out

    def unlearning_recipe(self) -> Recipe:
        """The recipe every method is built from: the named one with this run's overrides."""
        return replace(
            RECIPES[self.recipe], max_grad_norm=self.max_grad_norm, epochs=self.epochs, power_ratio=self.power
        )

    def attack(self) -> robustness.RelearnAttack:
        return robustness.RelearnAttack(
            tuple(self.relearn_fractions), steps=self.relearn_steps, lr=self.relearn_lr
        )


def _recipe_defaults(argv: list[str] | None) -> dict:
    """The named recipe's clip, budget and power become the defaults of their flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=RECIPES, default="paper")
    r = RECIPES[pre.parse_known_args(argv)[0].recipe]
    return {"epochs": r.epochs, "max_grad_norm": r.max_grad_norm, "power": r.power_ratio}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m munba_kernels.drivers.classify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Config()
    p.add_argument("--dataset", choices=datasets.DATASETS, default=d.dataset)
    p.add_argument(
        "--data-dir",
        default=None,
        help="local dataset files (Fashion-MNIST defaults to the Debian package's)",
    )
    p.add_argument(
        "--model",
        choices=MODELS,
        default=None,
        help="default: resnet18 for 32×32 data, narrow_resnet otherwise",
    )
    p.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default=d.scenario,
        help="hard: the --forget-ratio share of training samples the original fits best",
    )
    p.add_argument(
        "--forget-classes", type=int, nargs="+", default=d.forget_classes, help="for --scenario class"
    )
    p.add_argument(
        "--forget-ratio", type=options.fraction, default=d.forget_ratio, help="for --scenario random|hard"
    )
    p.add_argument("--methods", default="all", help=f"'all' or a comma list of {', '.join(METHODS)}")
    p.add_argument(
        "--seeds",
        type=options.positive_int,
        default=d.seeds,
        help="number of seeds (0, 1, …) to average over",
    )
    p.add_argument(
        "--epochs",
        type=options.positive_int,
        default=d.epochs,
        help="unlearning epochs, the same for every method",
    )
    p.add_argument(
        "--pretrain-epochs",
        type=options.positive_int,
        default=d.pretrain_epochs,
        help="epochs for the original and Retrain",
    )
    p.add_argument("--pretrain-lr", type=options.positive_float, default=d.pretrain_lr)
    all_note = options.int_at_least(0, " (0 = all)")
    p.add_argument("--train-size", type=all_note, default=d.train_size, help="training images used (0 = all)")
    p.add_argument(
        "--test-size",
        type=all_note,
        default=d.test_size,
        help="test images used, split into val/test halves (0 = all)",
    )
    p.add_argument("--batch-size", type=options.positive_int, default=d.batch_size)
    p.add_argument("--device", type=options.device, default=d.device, help="cpu, cuda or cuda:N")
    p.add_argument("--out", default=d.out)
    p.add_argument(
        "--cache-dir", default=d.cache_dir, help="where original/Retrain models are cached ($MUNBA_CACHE_DIR)"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny smoke run: small subsets, one epoch, one learning rate"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--distributed",
        choices=parallel.MODES,
        help="unlearn data-parallel (ddp) or sharded (fsdp2) across the ranks of a torchrun job; "
        "rank 0 trains the original and Retrain models, evaluates and writes the outputs",
    )
    r = p.add_argument_group("optimizer recipe (shared by every method)")
    r.add_argument("--recipe", choices=RECIPES, default=d.recipe, help="paper: SGD 0.9, wd 5e-4, clip 1")
    r.add_argument(
        "--max-grad-norm", type=options.clip_norm, help="clip of every method's direction; 'none' turns it off"
    )
    r.add_argument("--power", type=options.positive_float, help="MUNBa's bargaining power w_f/w_r (w_f + w_r = 2)")
    r.add_argument(
        "--neggrad-betas", type=options.fraction, nargs="+", default=d.neggrad_betas, help="NegGrad+'s β grid"
    )
    r.add_argument(
        "--lr-grid", type=options.positive_float, nargs="+", help="one learning-rate grid for all methods but GA"
    )
    r.add_argument(
        "--players",
        choices=PLAYERS,
        default=d.players,
        help="per-class: with --scenario class and several --forget-classes, also run each MUNBa method "
        "with one forget player per class (K = classes + 1) beside the merged two-player run",
    )
    a_ = p.add_argument_group("relearning attack")
    a_.add_argument("--no-relearn", action="store_true", help="skip the relearning attack")
    a_.add_argument("--relearn-steps", type=options.positive_int, default=d.relearn_steps)
    a_.add_argument("--relearn-lr", type=options.positive_float, default=d.relearn_lr)
    a_.add_argument("--relearn-fractions", type=options.fraction, nargs="+", default=d.relearn_fractions)
    return p


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Config:
    """The command line as a Config; a bad value exits through ``parser.error`` (one line, code 2).
    Checks that need the data or the file system are :func:`check_before_work`'s."""
    p = parser or build_parser()
    p.set_defaults(**_recipe_defaults(argv))
    a = p.parse_args(argv)
    methods = options.method_list(p, a.methods, METHODS)
    options.check_data_dir(p, a.dataset, a.data_dir)
    cfg = options.config_from_args(
        Config,
        a,
        methods=methods,
        progress=not a.no_progress,
        relearn=not a.no_relearn,
    )
    try:  # the recipe and attack validate their own values
        cfg.unlearning_recipe(), cfg.attack()
    except ValueError as e:
        p.error(str(e))
    if len(set(cfg.forget_classes)) != len(cfg.forget_classes):
        p.error(f"--forget-classes: each class once, got {' '.join(map(str, cfg.forget_classes))}")
    if cfg.players == "per-class":
        if not cfg.per_class_groups():
            p.error("--players per-class needs --scenario class and two or more --forget-classes")
        if not any(m.startswith("MUNBa") for m in cfg.methods):
            p.error("--players per-class needs a MUNBa method in --methods")
        if cfg.distributed:
            p.error("--players per-class runs in a single process (not with --distributed)")
    if cfg.quick:
        cfg.train_size, cfg.test_size = min(cfg.train_size or 600, 600), min(cfg.test_size or 300, 300)
        cfg.epochs, cfg.pretrain_epochs = 1, min(cfg.pretrain_epochs, 3)
        cfg.neggrad_betas, cfg.relearn_steps = [NEGGRAD_BETA], min(cfg.relearn_steps, 5)
    return cfg


@dataclass
class Split:
    """One seed's data: forget/retain from the training subset, val/test halves of the test set.

    ``probe`` is the labelled bank of the representation probe: the first half of the test
    subset with *every* class, so that a forgotten class can still be recognised in the features.
    """

    forget: Subset
    retain: Subset
    val: Subset
    test: Subset
    probe: Subset
    num_classes: int
    forget_spec: dict


def _train_xy(cfg: Config, ds: datasets.ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    train_idx = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(0))
    if cfg.train_size:
        train_idx = train_idx[: cfg.train_size]
    return ds.x_train[train_idx], ds.y_train[train_idx]


def prepare_data(cfg: Config, ds: datasets.ImageData, seed: int, mask: torch.Tensor | None = None) -> Split:
    """``mask`` (over the training subset) overrides the scenario's forget set (--scenario hard)."""
    fixed = torch.Generator().manual_seed(0)  # the subsets are part of the dataset, not the seed
    torch.randperm(len(ds.y_train), generator=fixed)  # the training subset's draw (see _train_xy)
    test_idx = torch.randperm(len(ds.y_test), generator=fixed)
    if cfg.test_size:
        test_idx = test_idx[: cfg.test_size]
    x, y = _train_xy(cfg, ds)
    if mask is None:
        mask = datasets.forget_mask(
            y, cfg.scenario, forget_classes=cfg.forget_classes, forget_ratio=cfg.forget_ratio, seed=seed
        )
    xt, yt = ds.x_test[test_idx], ds.y_test[test_idx]
    probe = (xt[: len(yt) // 2], yt[: len(yt) // 2])
    if cfg.scenario == "class":  # TA is measured on the classes that remain
        keep = ~torch.isin(yt, torch.tensor(cfg.forget_classes))
        xt, yt = xt[keep], yt[keep]
    half = len(yt) // 2
    dev = torch.device(cfg.device)

    def sub(a, b):
        return Subset(a.to(dev), b.to(dev))

    spec = {"scenario": cfg.scenario, "seed": seed}
    spec.update(
        {"forget_classes": cfg.forget_classes}
        if cfg.scenario == "class"
        else {"forget_ratio": cfg.forget_ratio}
    )
    return Split(
        sub(x[mask], y[mask]),
        sub(x[~mask], y[~mask]),
        sub(xt[:half], yt[:half]),
        sub(xt[half:], yt[half:]),
        sub(*probe),
        ds.num_classes,
        spec,
    )


def cached_training(cfg: Config, kind: str, data: Subset, split: Split, seed: int, in_channels: int):
    """Train (or load from the cache) the original or Retrain model; returns (model, seconds)."""
    key = {
        "version": CACHE_VERSION,
        "kind": kind,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "train_size": cfg.train_size,
        "epochs": cfg.pretrain_epochs,
        "lr": cfg.pretrain_lr,
        "batch_size": cfg.batch_size,
        "seed": seed,
        "n": len(data),
        **({"forget": split.forget_spec} if kind == "retrain" else {}),
    }
    key["data"] = fingerprint(data.x, data.y)  # the content: a relabelled copy is another model
    path = cache_path(cfg.cache_dir, "classify", f"{kind}-{cfg.dataset}-{cfg.model}", key)
    torch.manual_seed(seed)
    model = build_model(cfg.model, in_channels, split.num_classes).to(cfg.device)
    saved = load_entry(path, model, cfg.device)  # None (with a warning) for a damaged file
    if saved is not None:
        return model.eval(), saved["seconds"]
    start = time.perf_counter()
    train_classifier(
        model,
        data,
        epochs=cfg.pretrain_epochs,
        lr=cfg.pretrain_lr,
        batch_size=cfg.batch_size,
        seed=seed,
        desc=f"{kind} (seed {seed})",
        progress=cfg.progress,
    )
    seconds = time.perf_counter() - start
    save_atomic({"state_dict": model.state_dict(), "seconds": seconds, "key": key}, path)
    return model, seconds


def predict_splits(model, split: Split) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) of every evaluation set, each forwarded once per model."""
    sets = {"forget": split.forget, "retain": split.retain, "val": split.val, "test": split.test}
    return {name: (predict(model, s.x), s.y.cpu()) for name, s in sets.items()}


def evaluate(preds: dict, held_out: str) -> dict[str, float]:
    """UA, RA, TA, MIA with ``held_out`` ("val" for selection, "test" for reports) as the test set."""
    return unlearning_metrics(preds["forget"], preds["retain"], preds[held_out])


def class_ua(cfg: Config, preds: dict) -> dict[str, float]:
    """With several forget classes, the UA of each on its own (``UA[c]``) and their spread,
    max − min; empty otherwise."""
    if not cfg.per_class_groups():
        return {}
    logits, labels = preds["forget"]
    ua = {f"UA[{c}]": 100.0 - accuracy(logits[labels == c], labels[labels == c]) for c in cfg.forget_classes}
    return {**ua, "UA spread": max(ua.values()) - min(ua.values())}


def representation(model, split: Split, retrain_feats=None) -> tuple[dict[str, float], torch.Tensor]:
    """k-NN probe accuracy on forget features (bank: ``split.probe``) and CKA to Retrain."""
    head = classifier_head(model)
    bank = penultimate_features(model, head, split.probe.x)
    test_f = penultimate_features(model, head, split.test.x)
    probe = knn_probe_accuracy(
        bank, split.probe.y.cpu(), penultimate_features(model, head, split.forget.x), split.forget.y.cpu()
    )
    out = {"probe_forget": probe}
    if retrain_feats is not None:
        out["cka_to_retrain"] = linear_cka(test_f, retrain_feats)
    return out, test_f


EQUAL_BUDGET_ROW = f"NegGrad+ β={NEGGRAD_BETA:g}"


def train_subset(cfg: Config, ds: datasets.ImageData) -> Subset:
    """The training subset in its fixed order (the original model's training data, any scenario)."""
    x, y = _train_xy(cfg, ds)
    return Subset(x.to(cfg.device), y.to(cfg.device))


@dataclass
class SeedContext:
    """One seed's split, original and Retrain models, and Retrain's reference metrics."""

    split: Split
    original: torch.nn.Module
    original_seconds: float
    retrain: torch.nn.Module
    retrain_seconds: float
    retrain_val: dict
    retrain_test: dict
    retrain_repr: dict
    retrain_feats: torch.Tensor
    retrain_class_ua: dict  # UA[c] and their spread (several forget classes), else empty


def prepare_seed(cfg: Config, ds: datasets.ImageData, seed: int, ranks=parallel.SINGLE_PROCESS) -> SeedContext:
    """Rank 0's view of a seed: the split (hard: chosen by the original's margins) and the
    cached original and Retrain models with Retrain's validation and test metrics."""
    in_channels = ds.image_shape[0]
    full = train_subset(cfg, ds)
    # The original sees the training subset in one fixed order whatever the scenario, so the
    # cached model (whose key names no scenario) is the one every scenario would train.
    original, orig_s = cached_training(
        cfg, "original", full, SimpleNamespace(num_classes=ds.num_classes), seed, in_channels
    )
    mask = None
    if cfg.scenario == "hard":
        mask = robustness.hard_forget_mask(predict(original, full.x), full.y.cpu(), cfg.forget_ratio)
        mask = parallel.broadcast_mask(mask, len(mask), ranks)
    split = prepare_data(cfg, ds, seed, mask)
    retrain, retrain_s = cached_training(cfg, "retrain", split.retain, split, seed, in_channels)
    retrain_preds = predict_splits(retrain, split)
    retrain_repr, retrain_feats = representation(retrain, split)
    return SeedContext(
        split,
        original,
        orig_s,
        retrain,
        retrain_s,
        evaluate(retrain_preds, "val"),
        evaluate(retrain_preds, "test"),
        retrain_repr,
        retrain_feats,
        class_ua(cfg, retrain_preds),
    )


def relearn_row(cfg: Config, model, split: Split, seed: int) -> dict:
    """The relearning attack's curves and final accuracies (empty with --no-relearn)."""
    if not cfg.relearn:
        return {}
    curves = robustness.relearn_all(model, split.forget, cfg.attack(), seed)
    return {"relearn": curves, **{f"relearn {k}": c["forget_acc"][-1] for k, c in curves.items()}}


def run_method(
    cfg: Config,
    ctx: SeedContext,
    method: str,
    seed: int,
    log=print,
    ranks=parallel.SINGLE_PROCESS,
    snapshots: tuple[int, ...] = (),
    per_class: bool = False,
) -> tuple[dict[int, dict[str, dict]], list]:
    """Every grid point of ``method``, the point selected on validation, its test row (and for
    NegGrad+ the equal-budget row), for ``cfg.epochs`` and each epoch in ``snapshots`` (read
    off the same runs: see ``unlearn``).  ``per_class``: one forget player per forget class
    (the row is named ``method + PER_CLASS``).  Returns ({epochs: rows}, the selected final
    run's bargain trace)."""
    split = ctx.split
    row_name = method + PER_CLASS if per_class else method
    runs: dict[int, list] = {e: [] for e in (*snapshots, cfg.epochs)}
    for point in grid_points(cfg, method):
        final = unlearn_with(cfg, method, ctx.original, split, point, seed, ranks, snapshots, per_class)
        for epochs, run in [*final.snapshots.items(), (cfg.epochs, final)]:
            preds = predict_splits(run.model, split)
            gap_val = avg_gap(evaluate(preds, "val"), ctx.retrain_val)
            shown = " ".join(f"{k} {v:<7g}" for k, v in point.items())
            log(f"  seed {seed} {row_name:8s} {shown} epochs {epochs:<3d} val Avg. Gap {gap_val:6.2f}  ({run.seconds:.1f}s)")
            runs[epochs].append((gap_val, point, run, preds))
    by_epochs, trace = {}, []
    for epochs, candidates_all in runs.items():
        selections = {row_name: candidates_all}
        if method == "NegGrad+" and len(cfg.neggrad_betas) > 1 and NEGGRAD_BETA in cfg.neggrad_betas:
            selections[EQUAL_BUDGET_ROW] = [r for r in candidates_all if r[1]["beta"] == NEGGRAD_BETA]
        rows = by_epochs[epochs] = {}
        for name, candidates in selections.items():
            _, point, run, preds = min(candidates, key=lambda r: r[0])  # ties: the first point
            metrics = evaluate(preds, "test")
            rows[name] = {
                **metrics,
                **representation(run.model, split, ctx.retrain_feats)[0],
                "avg_gap": avg_gap(metrics, ctx.retrain_test),
                "val_gap": min(c[0] for c in candidates),
                "seconds": run.seconds,
                **point,
                "clipped_steps": _clipped_share(run.step_norms, run.settings["max_grad_norm"]),
                "settings": {**run.settings, "grid": [c[1] for c in candidates], "selected_by": "val gap"},
                "plan_digest": run.plan_digest,
                **class_ua(cfg, preds),
                **_mean_alpha(run),
                **relearn_row(cfg, run.model, split, seed),
            }
            if name == row_name and epochs == cfg.epochs:
                trace = run.bargain_log
    return by_epochs, trace


def run_seed(
    cfg: Config, ds: datasets.ImageData, seed: int, log=print, ranks: parallel.Ranks = parallel.SINGLE_PROCESS
) -> tuple[dict[str, dict], list]:
    """Every method on one seed.  Under torchrun only rank 0 trains, evaluates and returns rows;
    the other ranks take part in unlearning (the original's weights come from rank 0)."""
    if not ranks.lead:
        mask = None
        if cfg.scenario == "hard":
            mask = parallel.broadcast_mask(None, len(_train_xy(cfg, ds)[1]), ranks)
        split = prepare_data(cfg, ds, seed, mask)
        original = build_model(cfg.model, ds.image_shape[0], split.num_classes).to(cfg.device)
        for _, method, per_class in cfg.runs():
            for point in grid_points(cfg, method):
                unlearn_with(cfg, method, original, split, point, seed, ranks, per_class=per_class)
        return {}, []
    ctx = prepare_seed(cfg, ds, seed, ranks)
    split = ctx.split
    rows = {
        "Retrain": {
            **ctx.retrain_test,
            **ctx.retrain_repr,
            "avg_gap": 0.0,
            "cka_to_retrain": 1.0,
            "seconds": ctx.retrain_seconds,
            **ctx.retrain_class_ua,
            **relearn_row(cfg, ctx.retrain, split, seed),
        }
    }
    orig_preds = predict_splits(ctx.original, split)
    orig_test = evaluate(orig_preds, "test")
    rows["Original"] = {
        **orig_test,
        **representation(ctx.original, split, ctx.retrain_feats)[0],
        "avg_gap": avg_gap(orig_test, ctx.retrain_test),
        "seconds": ctx.original_seconds,
        **class_ua(cfg, orig_preds),
        **relearn_row(cfg, ctx.original, split, seed),
    }
    trace = []
    for row_name, method, per_class in cfg.runs():
        by_epochs, method_trace = run_method(cfg, ctx, method, seed, log, ranks, per_class=per_class)
        rows.update(by_epochs[cfg.epochs])
        if row_name == "MUNBa":
            trace = method_trace
    return rows, trace


def _mean_alpha(run) -> dict:
    """MUNBa runs: the players' bargaining weights α averaged over the steps."""
    if not run.bargain_log:
        return {}
    k = len(run.settings["players"])
    return {"mean_alpha": [statistics.fmean(row[i] for row in run.bargain_log) for i in range(k)]}


def _clipped_share(step_norms, clip) -> float:
    """Percent of steps whose direction the clip shortened."""
    if clip is None or not step_norms:
        return 0.0
    return 100.0 * sum(raw > clip for raw, _ in step_norms) / len(step_norms)


def grid_points(cfg: Config, method: str) -> list[dict]:
    """The hyperparameter points a method searches: learning rates (NegGrad+: × β)."""
    lrs = LR_GRID[method] if cfg.lr_grid is None or method == "GA" else tuple(cfg.lr_grid)
    if cfg.quick:
        lrs = lrs[:1]
    betas = cfg.neggrad_betas if method == "NegGrad+" else [None]
    return [{"lr": lr} if b is None else {"lr": lr, "beta": b} for lr in lrs for b in betas]


def unlearn_with(
    cfg: Config, method: str, original, split: Split, point: dict, seed: int, ranks, snapshots=(), per_class=False
):
    return unlearn(
        method,
        copy.deepcopy(original),
        split.forget,
        split.retain,
        num_classes=split.num_classes,
        batch_size=cfg.batch_size,
        seed=seed,
        recipe=cfg.unlearning_recipe(),
        snapshots=tuple(snapshots),
        progress=cfg.progress and ranks.lead,
        ranks=ranks,
        forget_groups=tuple(cfg.forget_classes) if per_class else (),
        **point,
    )


def aggregate(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Per row: the mean and (seeds > 1) sample std of every number over seeds; other values
    kept once if every seed agrees, else as the per-seed list; the per-seed rows alongside
    (relearning curves are summarised by :func:`aggregate_relearn`)."""
    out = {}
    for name in per_seed[0]:
        rows = [s[name] for s in per_seed]
        mean, std = {}, {}
        for k in rows[0]:
            if k == "relearn":
                continue
            values = [r[k] for r in rows]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and k not in (
                "lr",
                "beta",
            ):
                mean[k] = statistics.fmean(values)
                if len(values) > 1:
                    std[k] = statistics.stdev(values)
            else:
                mean[k] = values[0] if all(v == values[0] for v in values) else values
        mean["std"] = std
        mean["per_seed"] = [{k: v for k, v in r.items() if k != "relearn"} for r in rows]
        out[name] = mean
    return out


def report_columns(cfg: Config) -> tuple[str, ...]:
    """REPORT_COLUMNS, with each forget class's UA and their spread after UA when several are forgotten."""
    if not cfg.per_class_groups():
        return REPORT_COLUMNS
    extra = (*(f"UA[{c}]" for c in cfg.forget_classes), "UA spread")
    i = REPORT_COLUMNS.index("UA") + 1
    return REPORT_COLUMNS[:i] + extra + REPORT_COLUMNS[i:]


def check_before_work(cfg: Config, ranks: parallel.Ranks) -> datasets.ImageData:
    """The checks that need the file system or the data, before any training: --out and
    --cache-dir writable (on the rank that writes them), the data loadable and consistent, the
    forget classes among its classes.  Returns the loaded data; raises OptionError, DataError or
    FileNotFoundError naming the option or the file."""
    if ranks.lead:
        options.check_writable_dir("--out", cfg.out)
        options.check_writable_dir("--cache-dir", cfg.cache_dir)
    ds = datasets.load_dataset(cfg.dataset, cfg.data_dir)
    bad = [c for c in cfg.forget_classes if not 0 <= c < ds.num_classes] if cfg.scenario == "class" else []
    if bad:
        raise options.OptionError(
            f"--forget-classes {' '.join(map(str, bad))}: {cfg.dataset} has classes 0..{ds.num_classes - 1}"
        )
    return ds


def aggregate_relearn(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """``relearn[row][fraction]``: steps, mean and std of the forget accuracy over seeds, per seed."""
    out = {}
    for name in per_seed[0]:
        curves = [s[name]["relearn"] for s in per_seed if "relearn" in s[name]]
        if not curves:
            continue
        out[name] = {}
        for frac in curves[0]:
            accs = [c[frac]["forget_acc"] for c in curves]
            out[name][frac] = {
                "steps": curves[0][frac]["steps"],
                "slice": [c[frac]["slice"] for c in curves],
                "forget_acc": [statistics.fmean(col) for col in zip(*accs)],
                "std": [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*accs)],
                "per_seed": accs,
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    cfg = parse_args(argv, parser)
    ranks = parallel.SINGLE_PROCESS
    if cfg.distributed:
        ranks, cfg.device = parallel.init(cfg.distributed, cfg.device)
    try:
        with options.usage_errors(parser):
            ds = check_before_work(cfg, ranks)
        return run(cfg, ranks, ds)
    finally:
        parallel.shutdown(ranks)


def run(cfg: Config, ranks: parallel.Ranks, ds: datasets.ImageData | None = None) -> dict:
    """Every seed and the report (``ds``: the loaded data, default: load ``cfg.dataset``)."""
    ds = ds if ds is not None else datasets.load_dataset(cfg.dataset, cfg.data_dir)
    if cfg.model is None:
        cfg.model = "resnet18" if ds.image_shape[1] >= 32 else "narrow_resnet"
    if not ranks.lead:
        for seed in range(cfg.seeds):
            run_seed(cfg, ds, seed, ranks=ranks)
        return {}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = cfg.unlearning_recipe()
    print(
        f"{cfg.dataset}: {len(ds.y_train)} train / {len(ds.y_test)} test images; using "
        f"{cfg.train_size or 'all'} / {cfg.test_size or 'all'}; model {cfg.model}; scenario {cfg.scenario}"
        + (f"; {cfg.distributed} over {ranks.world} ranks" if cfg.distributed else "")
        + f"\nrecipe {cfg.recipe}: {recipe}"
    )
    per_seed, traces = [], []
    for seed in range(cfg.seeds):
        rows, trace = run_seed(cfg, ds, seed, ranks=ranks)
        per_seed.append(rows)
        traces.append(trace)
    methods = aggregate(per_seed)
    relearn = aggregate_relearn(per_seed)
    results = {"config": asdict(cfg), "recipe": asdict(recipe), "methods": methods, "relearn": relearn}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    title = (
        f"{cfg.dataset}, {cfg.scenario} forgetting "
        f"({'classes ' + str(cfg.forget_classes) if cfg.scenario == 'class' else f'{cfg.forget_ratio:.0%}'}), "
        f"{cfg.seeds} seed(s), mean{' ± std' if cfg.seeds > 1 else ''}"
    )
    table = markdown_table(methods, report_columns(cfg), title)
    (out / "results.md").write_text(table)
    plot_metric_bars(methods, GAP_METRICS, out / "metrics.png", title)
    written = ["results.json", "results.md", "metrics.png"]
    if relearn:
        plot_relearn(relearn, out / "relearn.png", f"relearning attack, {title}")
        written.append("relearn.png")
    if traces and traces[0]:
        plot_bargain_trace(
            traces[0], out / "munba_bargain.png", "MUNBa bargaining weights and cos φ (seed 0)"
        )
        (out / "munba_bargain.json").write_text(json.dumps(traces[0]))
        written += ["munba_bargain.png", "munba_bargain.json"]
    print("\n" + table)
    print(f"wrote {', '.join(str(out / w) for w in written)}")
    return results


if __name__ == "__main__":
    main()
