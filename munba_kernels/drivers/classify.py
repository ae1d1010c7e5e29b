"""Classification unlearning: MUNBa and the baselines side by side, evaluated against Retrain.

    python -m munba_kernels.drivers.classify --dataset fashion_mnist --scenario random \\
        --forget-ratio 0.1 --methods all --seeds 1 --epochs 2 --device cpu --out runs/fmnist

Per seed: train the original model on the training set and Retrain on the retain set
(both cached, keyed by their configuration), run every method for every learning rate of
its grid from the same original, pick each method's learning rate by the selection rule
below, and evaluate UA, RA, TA, MIA-Efficacy, Avg. Gap to Retrain, run time and the
representation checks.  Writes ``results.json``, ``results.md`` and PNG plots to --out.

Learning-rate selection (fixed in advance, identical for every method): the test set is
split in two fixed halves.  For each learning rate the Avg. Gap to Retrain is computed with
TA and the MIA's non-member set taken from the *validation* half; the rate with the
smallest validation gap wins (ties: the smaller rate).  Reported numbers use the other half.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from munba_kernels.evaluation import avg_gap, knn_probe_accuracy, linear_cka, penultimate_features
from munba_kernels.evaluation.metrics import GAP_METRICS, unlearning_metrics
from munba_kernels.evaluation.report import markdown_table, plot_bargain_trace, plot_metric_bars

from . import data as datasets
from . import options, parallel
from .cache import cache_path, default_cache_dir, fingerprint, load_entry, save_atomic
from .models import MODELS, build_model, classifier_head
from .unlearning import METHODS, Subset, predict, train_classifier, unlearn

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
}
#: Part of every cache key: bump it when training code changes so stale models are not reused.
CACHE_VERSION = 1
REPORT_COLUMNS = ("UA", "RA", "TA", "MIA", "avg_gap", "probe_forget", "cka_to_retrain", "seconds", "lr")


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
    p.add_argument("--scenario", choices=("class", "random"), default=d.scenario)
    p.add_argument(
        "--forget-classes", type=int, nargs="+", default=d.forget_classes, help="for --scenario class"
    )
    p.add_argument(
        "--forget-ratio", type=options.fraction, default=d.forget_ratio, help="for --scenario random"
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
    return p


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Config:
    """The command line as a Config; a bad value exits through ``parser.error`` (one line, code 2).
    Checks that need the data or the file system are :func:`check_before_work`'s."""
    p = parser or build_parser()
    a = p.parse_args(argv)
    methods = options.method_list(p, a.methods, METHODS)
    options.check_data_dir(p, a.dataset, a.data_dir)
    cfg = Config(
        dataset=a.dataset,
        data_dir=a.data_dir,
        model=a.model,
        scenario=a.scenario,
        forget_classes=a.forget_classes,
        forget_ratio=a.forget_ratio,
        methods=methods,
        seeds=a.seeds,
        epochs=a.epochs,
        pretrain_epochs=a.pretrain_epochs,
        pretrain_lr=a.pretrain_lr,
        train_size=a.train_size,
        test_size=a.test_size,
        batch_size=a.batch_size,
        device=a.device,
        out=a.out,
        cache_dir=a.cache_dir,
        quick=a.quick,
        progress=not a.no_progress,
        distributed=a.distributed,
    )
    if cfg.quick:
        cfg.train_size, cfg.test_size = min(cfg.train_size or 600, 600), min(cfg.test_size or 300, 300)
        cfg.epochs, cfg.pretrain_epochs = 1, min(cfg.pretrain_epochs, 3)
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


def prepare_data(cfg: Config, ds: datasets.ImageData, seed: int) -> Split:
    fixed = torch.Generator().manual_seed(0)  # the subsets are part of the dataset, not the seed
    train_idx = torch.randperm(len(ds.y_train), generator=fixed)
    if cfg.train_size:
        train_idx = train_idx[: cfg.train_size]
    test_idx = torch.randperm(len(ds.y_test), generator=fixed)
    if cfg.test_size:
        test_idx = test_idx[: cfg.test_size]
    x, y = ds.x_train[train_idx], ds.y_train[train_idx]
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


def run_seed(
    cfg: Config, ds: datasets.ImageData, seed: int, log=print, ranks: parallel.Ranks = parallel.SINGLE_PROCESS
) -> tuple[dict[str, dict], list]:
    """Every method on one seed.  Under torchrun only rank 0 trains, evaluates and returns rows;
    the other ranks take part in unlearning (the original's weights come from rank 0)."""
    split = prepare_data(cfg, ds, seed)
    in_channels = ds.image_shape[0]
    if not ranks.lead:
        original = build_model(cfg.model, in_channels, split.num_classes).to(cfg.device)
        for method in cfg.methods:
            for lr in lr_grid(cfg, method):
                unlearn_with(cfg, method, original, split, lr, seed, ranks)
        return {}, []
    train_all = Subset(
        torch.cat([split.forget.x, split.retain.x]), torch.cat([split.forget.y, split.retain.y])
    )
    original, orig_s = cached_training(cfg, "original", train_all, split, seed, in_channels)
    retrain, retrain_s = cached_training(cfg, "retrain", split.retain, split, seed, in_channels)

    retrain_preds = predict_splits(retrain, split)
    retrain_val, retrain_test = evaluate(retrain_preds, "val"), evaluate(retrain_preds, "test")
    retrain_repr, retrain_feats = representation(retrain, split)
    rows = {
        "Retrain": {
            **retrain_test,
            **retrain_repr,
            "avg_gap": 0.0,
            "cka_to_retrain": 1.0,
            "seconds": retrain_s,
        }
    }
    orig_test = evaluate(predict_splits(original, split), "test")
    rows["Original"] = {
        **orig_test,
        **representation(original, split, retrain_feats)[0],
        "avg_gap": avg_gap(orig_test, retrain_test),
        "seconds": orig_s,
    }
    trace = []
    for method in cfg.methods:
        best = None
        for lr in lr_grid(cfg, method):
            run = unlearn_with(cfg, method, original, split, lr, seed, ranks)
            preds = predict_splits(run.model, split)
            gap_val = avg_gap(evaluate(preds, "val"), retrain_val)
            log(f"  seed {seed} {method:8s} lr {lr:<7g} val Avg. Gap {gap_val:6.2f}  ({run.seconds:.1f}s)")
            if best is None or gap_val < best[0]:
                best = (gap_val, lr, run, preds)
        _, lr, run, preds = best
        metrics = evaluate(preds, "test")
        rows[method] = {
            **metrics,
            **representation(run.model, split, retrain_feats)[0],
            "avg_gap": avg_gap(metrics, retrain_test),
            "seconds": run.seconds,
            "lr": lr,
        }
        if method == "MUNBa":
            trace = run.bargain_log
    return rows, trace


def lr_grid(cfg: Config, method: str) -> tuple[float, ...]:
    return LR_GRID[method][:1] if cfg.quick else LR_GRID[method]


def unlearn_with(cfg: Config, method: str, original, split: Split, lr: float, seed: int, ranks):
    return unlearn(
        method,
        copy.deepcopy(original),
        split.forget,
        split.retain,
        num_classes=split.num_classes,
        epochs=cfg.epochs,
        lr=lr,
        batch_size=cfg.batch_size,
        seed=seed,
        progress=cfg.progress and ranks.lead,
        ranks=ranks,
    )


def aggregate(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Mean over seeds of every numeric entry, with the per-seed values alongside."""
    out = {}
    for name in per_seed[0]:
        rows = [s[name] for s in per_seed]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "lr"}
        if "lr" in rows[0]:  # selected per seed: one value if they agree, else the list
            lrs = [r["lr"] for r in rows]
            mean["lr"] = lrs[0] if len(set(lrs)) == 1 else lrs
        mean["per_seed"] = rows
        out[name] = mean
    return out


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
    print(
        f"{cfg.dataset}: {len(ds.y_train)} train / {len(ds.y_test)} test images; using "
        f"{cfg.train_size or 'all'} / {cfg.test_size or 'all'}; model {cfg.model}; scenario {cfg.scenario}"
        + (f"; {cfg.distributed} over {ranks.world} ranks" if cfg.distributed else "")
    )
    per_seed, traces = [], []
    for seed in range(cfg.seeds):
        rows, trace = run_seed(cfg, ds, seed, ranks=ranks)
        per_seed.append(rows)
        traces.append(trace)
    methods = aggregate(per_seed)
    results = {"config": asdict(cfg), "methods": methods}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    title = (
        f"{cfg.dataset}, {cfg.scenario} forgetting "
        f"({'classes ' + str(cfg.forget_classes) if cfg.scenario == 'class' else f'{cfg.forget_ratio:.0%}'}), "
        f"{cfg.seeds} seed(s), mean"
    )
    table = markdown_table(methods, REPORT_COLUMNS, title)
    (out / "results.md").write_text(table)
    plot_metric_bars(methods, GAP_METRICS, out / "metrics.png", title)
    if traces and traces[0]:
        plot_bargain_trace(
            traces[0], out / "munba_bargain.png", "MUNBa bargaining weights and cos φ (seed 0)"
        )
        (out / "munba_bargain.json").write_text(json.dumps(traces[0]))
    print("\n" + table)
    print(
        f"wrote {out / 'results.json'}, results.md, metrics.png"
        + (", munba_bargain.png" if traces[0] else "")
    )
    return results


if __name__ == "__main__":
    main()
