"""Diffusion unlearning: erase classes from a class-conditional DDPM with MUNBa and baselines.

    python -m munba_kernels.drivers.diffusion --dataset fashion_mnist --forget-class 3 \\
        --methods all --device cpu --out runs/diffusion [--quick]
    python -m munba_kernels.drivers.diffusion --forget-classes 1 3 8 --players per-class ...

Embedded default (CPU, offline): train a small class-conditional DDPM (diffusers UNet2DModel,
class dropout for classifier-free guidance) and a judge classifier (narrow ResNet) on the
dataset at --image-size, both cached; unlearn --forget-class with MUNBa, Naive (the same two
losses summed) and ESD (negative guidance); generate --samples-per-class DDIM samples per
class from every model with the same initial noise; let the judge label them.  Reports, per
model: forget_recognition (% of forget-class generations the judge calls that class; UA =
100 − it), retain_accuracy (mean judge accuracy over the retained classes' generations) and
feature_distance (KID on judge features: retain generations vs real retain test images).
Writes results.json, results.md, samples.png (rows = classes, one panel per model),
relearn.png, munba_bargain.png and munba_bargain.json to --out.  Losses and methods:
munba_kernels/drivers/ddpm.py.

Several erased classes (--forget-classes 1 3 8; --forget-class is the same option): each is
mapped to its own anchor (default: the next class that is not erased; an explicit
--anchor-class serves them all), the retained classes are the rest, and every row also
reports each erased class's recognition and their spread (max − min).  --players per-class
adds a "MUNBa per-class" row (one bargaining player per erased class plus preserve) beside
"MUNBa" (the erased classes' forget losses merged into one player) and Naive, on the same
batches, noise and timesteps.  The relearning attack is skipped for several classes (its
Retrain DDPM would be a new pre-training run: see RELEARN_SEVERAL).

Fairness: MUNBa and Naive (and ESD) are built from one recipe (ddpm.DiffusionRecipe: AdamW,
--unlearn-lr, --unlearn-steps, weight decay 0, --max-grad-norm, off by default) and see the
same batches, noise and timesteps; results.json records each method's settings, read back
from its optimizer.  --power sets MUNBa's w_f/w_r; --power-schedule forget-loss lets it
follow the forget loss (an option, not the default; see ddpm.scheduled_power_ratio).

Relearning attack (--no-relearn to skip): every unlearned model, the original and a Retrain
DDPM (pre-trained the same way without the forget class, cached) are fine-tuned on
--relearn-images forget-class images for --relearn-steps AdamW steps; forget recognition
of the forget class's generations is tracked along the way (results.json "relearn").

Stable Diffusion (GPU users): --pretrained DIR (a local StableDiffusionPipeline folder)
--forget-prompt "..." --anchor-prompt "..." fine-tunes the UNet with MUNBa to erase the
concept and saves the pipeline to OUTDIR/pipeline (munba_kernels/drivers/stable_diffusion.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from munba_kernels.evaluation import (
    accuracy,
    generation_scores,
    kernel_inception_distance,
    penultimate_features,
)
from munba_kernels.evaluation.generation import save_sample_grid
from munba_kernels.evaluation.report import markdown_table, plot_bargain_trace, plot_relearn

from . import data as datasets
from . import ddpm, options
from .cache import cache_path, default_cache_dir, fingerprint, load_entry, save_atomic
from .models import build_model, classifier_head
from .unlearning import Subset, predict, train_classifier

#: Part of every cache key: bump it when the DDPM or judge training code changes.
CACHE_VERSION = 1
GRID_SAMPLES = 8  # samples per class shown in samples.png
REPORT_COLUMNS = ("forget_recognition", "UA", "retain_accuracy", "feature_distance", "seconds")
#: The report row of MUNBa with one bargaining player per erased class (--players per-class).
PER_CLASS_ROW = "MUNBa per-class"
RELEARN_SEVERAL = (
    "relearning attack skipped: with several erased classes it needs a Retrain DDPM pre-trained "
    "without all of them, a new ~20-minute pre-training run per class set on one CPU thread"
)
FASHION_MNIST_CLASSES = (
    "T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"
)  # fmt: skip


@dataclass
class Config:
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    forget_classes: list[int] = field(default_factory=lambda: [3])
    anchor_class: int | None = None  # default: per erased class, the next one not erased (ddpm.default_anchor)
    anchor_classes: list[int] = field(default_factory=list)  # derived: one per forget class (_check_classes)
    players: str = "merged"  # MUNBa with several erased classes: ddpm.PLAYERS
    methods: list[str] = field(default_factory=lambda: list(ddpm.UNLEARN_METHODS))
    image_size: int = 16
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    ddpm_steps: int = 2500
    ddpm_batch_size: int = 64
    ddpm_lr: float = 2e-3
    class_dropout: float = 0.1
    ema_decay: float = 0.999
    judge_epochs: int = 6
    judge_train_size: int = 20000
    unlearn_steps: int = 300
    unlearn_batch_size: int = 32
    unlearn_lr: float = 5e-5
    esd_eta: float = 1.0
    max_grad_norm: float | None = None
    power: float = 1.0
    power_schedule: str = "constant"
    power_threshold: float = 0.1
    relearn: bool = True
    relearn_images: int = 16
    relearn_steps: int = 100
    relearn_every: int = 25
    relearn_lr: float = 1e-4
    sample_steps: int = 25
    guidance: float = 2.0
    samples_per_class: int = 100
    seed: int = 0  # the DDPM, the judge and the first unlearning seed
    seeds: int = 1  # unlearning seeds (batches, noise, timesteps, sampling noise) on that DDPM
    device: str = "cpu"
    out: str = "runs/diffusion"
    cache_dir: str = field(default_factory=default_cache_dir)
    quick: bool = False
    progress: bool = True
    # Stable Diffusion path (--pretrained); see stable_diffusion.py
    pretrained: str | None = None
    forget_prompts: list[str] = field(default_factory=list)
    anchor_prompt: str | None = None
    retain_prompts: list[str] = field(default_factory=list)
    sd_train: str = "xattn"
    sd_steps: int = 100
    sd_lr: float = 1e-5
    sd_images: int = 4
    sd_inference_steps: int = 25

    @property
    def forget_class(self) -> int:
        """The erased class of a one-class run (the first of several)."""
        return self.forget_classes[0]

    def rows(self) -> list[str]:
        """The unlearned models' report rows: the methods, and "MUNBa per-class" after MUNBa
        under ``players="per-class"``."""
        extra = [PER_CLASS_ROW] if self.players == "per-class" else []
        return [r for m in self.methods for r in ([m, *extra] if m == "MUNBa" else [m])]

    def unlearning_recipe(self) -> ddpm.DiffusionRecipe:
        """The recipe every method is built from (MUNBa, Naive and ESD alike)."""
        return ddpm.DiffusionRecipe(
            lr=self.unlearn_lr,
            steps=self.unlearn_steps,
            max_grad_norm=self.max_grad_norm,
            power_ratio=self.power,
            power_schedule=self.power_schedule,
            power_threshold=self.power_threshold,
        )


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    positive_int, positive_float = options.positive_int, options.positive_float
    p = argparse.ArgumentParser(
        prog="python -m munba_kernels.drivers.diffusion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", choices=datasets.DATASETS, default=d.dataset)
    p.add_argument(
        "--data-dir", default=None, help="local dataset files (Fashion-MNIST: the Debian package's)"
    )
    p.add_argument(
        "--forget-classes",
        "--forget-class",
        dest="forget_classes",
        type=int,
        nargs="+",
        metavar="CLASS",
        default=d.forget_classes,
        help="class(es) to erase; the retained classes are the rest",
    )
    p.add_argument(
        "--anchor-class",
        type=int,
        default=None,
        help="class every forget class is mapped to (default: per class, the next one not erased)",
    )
    p.add_argument(
        "--players",
        choices=ddpm.PLAYERS,
        default=d.players,
        help="several erased classes: per-class adds MUNBa with one player per class (row "
        f"'{PER_CLASS_ROW}') beside the merged two-player MUNBa",
    )
    methods = ", ".join(ddpm.UNLEARN_METHODS)
    p.add_argument("--methods", default="all", help=f"'all' or a comma list of {methods}")
    p.add_argument(
        "--image-size", type=positive_int, default=d.image_size, help="DDPM resolution"
    )
    p.add_argument(
        "--ddpm-steps", type=positive_int, default=d.ddpm_steps, help="pre-training steps"
    )
    p.add_argument("--unlearn-steps", type=positive_int, default=d.unlearn_steps)
    p.add_argument(
        "--unlearn-lr", type=positive_float, default=d.unlearn_lr, help="AdamW, every method"
    )
    p.add_argument("--esd-eta", type=options.finite_float, default=d.esd_eta, help="ESD negative-guidance strength")
    p.add_argument(
        "--max-grad-norm", type=options.clip_norm, default=d.max_grad_norm, help="clip of every method (default: none)"
    )
    p.add_argument("--power", type=positive_float, default=d.power, help="MUNBa's bargaining power w_f/w_r")
    p.add_argument(
        "--power-schedule",
        choices=ddpm.POWER_SCHEDULES,
        default=d.power_schedule,
        help="forget-loss: w_f/w_r shrinks once the forget loss is below --power-threshold × its first value",
    )
    p.add_argument("--power-threshold", type=options.fraction, default=d.power_threshold)
    p.add_argument("--no-relearn", action="store_true", help="skip the relearning attack")
    p.add_argument("--relearn-images", type=positive_int, default=d.relearn_images)
    p.add_argument("--relearn-steps", type=positive_int, default=d.relearn_steps)
    p.add_argument("--relearn-every", type=positive_int, default=d.relearn_every)
    p.add_argument("--relearn-lr", type=positive_float, default=d.relearn_lr)
    p.add_argument(
        "--sample-steps", type=positive_int, default=d.sample_steps, help="DDIM steps"
    )
    p.add_argument("--guidance", type=options.finite_float, default=d.guidance, help="classifier-free guidance scale")
    p.add_argument("--samples-per-class", type=positive_int, default=d.samples_per_class)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the DDPM and the judge")
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=d.seeds,
        help="unlearning seeds (batches, noise, sampling) averaged on that one DDPM",
    )
    p.add_argument("--device", type=options.device, default=d.device, help="cpu, cuda or cuda:N")
    p.add_argument("--out", default=d.out)
    p.add_argument(
        "--cache-dir", default=d.cache_dir, help="where the DDPM and judge are cached ($MUNBA_CACHE_DIR)"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run in about a minute: tiny budgets everywhere"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sd = p.add_argument_group("Stable Diffusion (--pretrained)")
    sd.add_argument(
        "--pretrained", default=None, help="local StableDiffusionPipeline folder (never downloaded)"
    )
    sd.add_argument(
        "--forget-prompt", action="append", default=[], help="prompt of the concept to erase (repeatable)"
    )
    sd.add_argument("--anchor-prompt", default=None, help="harmless prompt the forget prompts are mapped to")
    sd.add_argument(
        "--retain-prompt",
        action="append",
        default=[],
        help="prompts to preserve (repeatable; default: the anchor)",
    )
    sd.add_argument(
        "--sd-train", choices=("xattn", "full"), default=d.sd_train, help="UNet weights fine-tuned"
    )
    sd.add_argument("--sd-steps", type=positive_int, default=d.sd_steps, help="unlearning steps")
    sd.add_argument("--sd-lr", type=positive_float, default=d.sd_lr)
    sd.add_argument(
        "--sd-images", type=positive_int, default=d.sd_images, help="latents generated per prompt"
    )
    sd.add_argument(
        "--sd-inference-steps", type=positive_int, default=d.sd_inference_steps
    )
    return p


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Config:
    """The command line as a Config; a bad value exits through ``parser.error`` (one line, code 2).
    Checks that need the data or the file system are :func:`check_before_work`'s."""
    p = parser or build_parser()
    a = p.parse_args(argv)
    chosen = options.method_list(p, a.methods, ddpm.UNLEARN_METHODS)
    fc = a.forget_classes
    given = f"--forget-classes {' '.join(map(str, fc))}"
    if len(set(fc)) != len(fc):
        p.error(f"{given}: each class once (duplicates {sorted({c for c in fc if fc.count(c) > 1})})")
    if min(fc) < 0:
        p.error(f"{given}: classes are numbered from 0")
    if a.anchor_class is not None and a.anchor_class in fc:
        p.error(f"--anchor-class {a.anchor_class} is one of the erased classes ({given})")
    if a.players == "per-class" and (len(fc) < 2 or "MUNBa" not in chosen):
        p.error(
            "--players per-class needs several --forget-classes and MUNBa among --methods "
            "(with one erased class it is the two-player bargain)"
        )
    if a.pretrained is not None and (not a.forget_prompt or a.anchor_prompt is None):
        p.error("--pretrained needs at least one --forget-prompt and an --anchor-prompt")
    if a.pretrained is None:
        options.check_data_dir(p, a.dataset, a.data_dir)
        sd_only = {"--forget-prompt": a.forget_prompt, "--retain-prompt": a.retain_prompt}
        given = [o for o, v in {**sd_only, "--anchor-prompt": a.anchor_prompt}.items() if v]
        if given:
            p.error(f"{', '.join(given)}: only for Stable Diffusion, which needs --pretrained DIR")
    cfg = options.config_from_args(
        Config,
        a,
        methods=chosen,
        relearn=not a.no_relearn and len(fc) == 1,  # several classes: RELEARN_SEVERAL
        progress=not a.no_progress,
        forget_prompts=a.forget_prompt,
        retain_prompts=a.retain_prompt,
    )
    try:  # the recipe validates its own values
        cfg.unlearning_recipe()
    except ValueError as e:
        p.error(str(e))
    if cfg.quick:
        cfg.ddpm_steps, cfg.unlearn_steps = min(cfg.ddpm_steps, 200), min(cfg.unlearn_steps, 20)
        cfg.judge_epochs, cfg.judge_train_size = 2, min(cfg.judge_train_size, 2000)
        cfg.samples_per_class, cfg.sample_steps = min(cfg.samples_per_class, 8), min(cfg.sample_steps, 10)
        cfg.channels = [16, 32]
        cfg.relearn_steps, cfg.relearn_every = min(cfg.relearn_steps, 4), min(cfg.relearn_every, 2)
    halvings = len(cfg.channels) - 1  # the UNet's down-sampling steps (ddpm.build_unet)
    if cfg.pretrained is None and cfg.image_size % 2**halvings:
        p.error(f"--image-size {cfg.image_size}: must be divisible by {2**halvings} (the UNet halves it)")
    return cfg


def _check_classes(cfg: Config, num_classes: int) -> None:
    """Range checks that need the data's class count; fills ``cfg.anchor_classes`` (and, for
    one erased class, ``cfg.anchor_class``, as before several classes existed)."""
    fc = cfg.forget_classes
    bad = [c for c in fc if not 0 <= c < num_classes]
    if bad:
        raise options.OptionError(
            f"--forget-classes {' '.join(map(str, bad))}: outside 0..{num_classes - 1}"
        )
    if len(set(fc)) >= num_classes:
        raise options.OptionError(f"--forget-classes: at least one of the {num_classes} classes must be retained")
    if cfg.anchor_class is None and len(fc) == 1:
        cfg.anchor_class = ddpm.default_anchor(fc[0], num_classes)
    if cfg.anchor_class is not None and (not 0 <= cfg.anchor_class < num_classes or cfg.anchor_class in fc):
        raise options.OptionError(
            f"--anchor-class {cfg.anchor_class} must be a class in 0..{num_classes - 1} other than the "
            "forget class" + ("es" if len(fc) > 1 else "")
        )
    cfg.anchor_classes = [
        ddpm.default_anchor(c, num_classes, fc) if cfg.anchor_class is None else cfg.anchor_class for c in fc
    ]


def _anchor(cfg: Config):
    """What ddpm.unlearn_class takes: the anchor of one class, {class: anchor} of several."""
    return cfg.anchor_class if len(cfg.forget_classes) == 1 else dict(zip(cfg.forget_classes, cfg.anchor_classes))


def _cached(cfg: Config, kind: str, key: dict, data: Subset, build, train):
    """Load ``kind`` from the cache or build and train it on ``data``; returns (model, training seconds)."""
    key = {"version": CACHE_VERSION, "kind": kind, "dataset": cfg.dataset, "seed": cfg.seed, **key}
    key["data"] = fingerprint(data.x, data.y)  # the content: a relabelled copy is another model
    path = cache_path(cfg.cache_dir, "diffusion", f"{kind}-{cfg.dataset}", key)
    torch.manual_seed(cfg.seed)
    model = build().to(cfg.device)
    saved = load_entry(path, model, cfg.device)  # None (with a warning) for a damaged file
    if saved is not None:
        return model.eval(), saved["seconds"]
    start = time.perf_counter()
    train(model)
    seconds = time.perf_counter() - start
    save_atomic({"state_dict": model.state_dict(), "seconds": seconds, "key": key}, path)
    return model.eval(), seconds


def judge_classifier(cfg: Config, train: Subset, in_channels: int, num_classes: int):
    """The narrow ResNet that labels generations, trained on real images at the DDPM's resolution."""
    n = min(cfg.judge_train_size, len(train)) if cfg.judge_train_size else len(train)
    key = {"image_size": cfg.image_size, "epochs": cfg.judge_epochs, "n": n, "lr": 0.05, "batch_size": 128}
    data = Subset((train.x[:n] + 1) / 2, train.y[:n])
    return _cached(
        cfg,
        "judge",
        key,
        data,
        lambda: build_model("narrow_resnet", in_channels, num_classes),
        lambda m: train_classifier(
            m,
            data,
            epochs=cfg.judge_epochs,
            lr=0.05,
            batch_size=128,
            seed=cfg.seed,
            desc="judge",
            progress=cfg.progress,
        ),
    )


def pretrained_ddpm(cfg: Config, train: Subset, in_channels: int, num_classes: int, kind: str = "ddpm"):
    """The original DDPM (``kind="ddpm"``) or Retrain (``"ddpm-retrain"``: ``train`` holds no
    forget-class image), pre-trained identically and cached."""
    key = {
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "steps": cfg.ddpm_steps,
        "batch_size": cfg.ddpm_batch_size,
        "lr": cfg.ddpm_lr,
        "class_dropout": cfg.class_dropout,
        "ema_decay": cfg.ema_decay,
        "n": len(train),
        **({} if kind == "ddpm" else {"forget_class": cfg.forget_class} if len(cfg.forget_classes) == 1
           else {"forget_classes": sorted(cfg.forget_classes)}),
    }
    return _cached(
        cfg,
        kind,
        key,
        train,
        lambda: ddpm.build_unet(cfg.image_size, in_channels, num_classes, cfg.channels),
        lambda m: ddpm.train_ddpm(
            m,
            train,
            num_classes=num_classes,
            steps=cfg.ddpm_steps,
            batch_size=cfg.ddpm_batch_size,
            lr=cfg.ddpm_lr,
            class_dropout=cfg.class_dropout,
            ema_decay=cfg.ema_decay,
            seed=cfg.seed,
            progress=cfg.progress,
        ),
    )


def evaluate_generator(
    cfg: Config, model, judge, num_classes: int, real_retain_feats: torch.Tensor, name: str, unlearn_seed: int = 0
):
    """Samples for every class (same noise for every model of an unlearning seed), judged;
    returns (row, samples [K, n, ...])."""
    labels = torch.arange(num_classes).repeat_interleave(cfg.samples_per_class)
    images = ddpm.sample(
        model,
        labels.to(cfg.device),
        null_class=num_classes,
        steps=cfg.sample_steps,
        guidance=cfg.guidance,
        seed=cfg.seed + 12345 + unlearn_seed,  # fixed and unrelated to the training streams
        progress=cfg.progress,
    )
    logits = predict(judge, images.to(cfg.device))
    fc = cfg.forget_classes
    scores = generation_scores(logits, labels, fc[0])
    retain = ~torch.isin(labels, torch.tensor(fc))
    feats = penultimate_features(judge, classifier_head(judge), images[retain].to(cfg.device))
    if len(fc) == 1:
        forget, retained = scores["forget_recognition"], scores["retain_accuracy"]
    else:  # every class counts once, as in generation_scores
        per = scores["per_class"]
        forget = statistics.fmean(per[c] for c in fc)
        retained = statistics.fmean(v for c, v in per.items() if c not in fc)
    row = {
        "forget_recognition": forget,
        "UA": 100.0 - forget,
        "retain_accuracy": retained,
        "feature_distance": kernel_inception_distance(feats, real_retain_feats),
    }
    if len(fc) > 1:
        rec = {c: scores["per_class"][c] for c in fc}
        row.update({f"forget_recognition_{c}": v for c, v in rec.items()})
        row.update({f"UA_{c}": 100.0 - v for c, v in rec.items()})
        row["forget_spread"] = max(rec.values()) - min(rec.values())
    row["per_class_accuracy"] = scores["per_class"]
    each = "" if len(fc) == 1 else " (" + ", ".join(f"{c}: {row[f'forget_recognition_{c}']:.0f}" for c in fc) + ")"
    print(
        f"  {name:8s} forget recognition {row['forget_recognition']:6.2f}%{each}  retain accuracy "
        f"{row['retain_accuracy']:6.2f}%  KID {row['feature_distance']:.4f}"
    )
    return row, images.reshape(num_classes, cfg.samples_per_class, *images.shape[1:])


@dataclass
class Setup:
    """What every unlearning seed shares: data, judge, the original DDPM, KID's reference."""

    num_classes: int
    in_channels: int
    judge: torch.nn.Module
    judge_seconds: float
    judge_accuracy: float
    original: torch.nn.Module
    ddpm_seconds: float
    real_feats: torch.Tensor
    forget: Subset
    retain: Subset


def check_before_work(cfg: Config) -> datasets.ImageData | None:
    """The checks that need the file system or the data, before any training: --out (and for the
    class-conditional DDPM --cache-dir) writable, the --pretrained folder a pipeline, the data
    loadable and consistent, the classes among its classes.  Returns the loaded data (None with
    --pretrained); raises OptionError, DataError or FileNotFoundError naming the option or file."""
    options.check_writable_dir("--out", cfg.out)
    if cfg.pretrained is not None:
        from .stable_diffusion import check_pipeline_folder

        check_pipeline_folder(cfg.pretrained)
        return None
    options.check_writable_dir("--cache-dir", cfg.cache_dir)
    ds = datasets.load_dataset(cfg.dataset, cfg.data_dir)
    _check_classes(cfg, ds.num_classes)
    return ds


def setup(cfg: Config, ds: datasets.ImageData | None = None) -> Setup:
    """What every seed shares (``ds``: the loaded data, default: load ``cfg.dataset``)."""
    if ds is None:
        ds = datasets.load_dataset(cfg.dataset, cfg.data_dir)
        _check_classes(cfg, ds.num_classes)
    k, in_channels, dev = ds.num_classes, ds.image_shape[0], torch.device(cfg.device)
    order = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(0))
    train = Subset(ddpm.to_model_range(ds.x_train[order], cfg.image_size).to(dev), ds.y_train[order].to(dev))
    test_x = (ddpm.to_model_range(ds.x_test, cfg.image_size) + 1) / 2
    erased = (
        f"forget class {cfg.forget_class}, anchor class {cfg.anchor_class}"
        if len(cfg.forget_classes) == 1
        else f"forget classes {cfg.forget_classes}, anchor classes {cfg.anchor_classes}"
    )
    print(
        f"{cfg.dataset}: {len(train)} training images at {cfg.image_size}×{cfg.image_size}; {erased}; "
        f"methods {', '.join(cfg.rows())}"
    )
    judge, judge_s = judge_classifier(cfg, train, in_channels, k)
    judge_acc = generation_scores(predict(judge, test_x.to(dev)), ds.y_test, cfg.forget_class)["per_class"]
    print(f"judge accuracy on real test images: {sum(judge_acc.values()) / k:.2f}% ({judge_s:.0f}s training)")
    original, ddpm_s = pretrained_ddpm(cfg, train, in_channels, k)
    print(f"DDPM ready ({ddpm_s:.0f}s training)")

    # Real retain test images for KID: as many as the retain generations, a fixed subset.
    erased = torch.tensor(cfg.forget_classes)
    real = test_x[~torch.isin(ds.y_test, erased)]
    real = real[
        torch.randperm(len(real), generator=torch.Generator().manual_seed(1))[
            : (k - len(cfg.forget_classes)) * cfg.samples_per_class
        ]
    ]
    real_feats = penultimate_features(judge, classifier_head(judge), real.to(dev))
    forget_mask = torch.isin(train.y, erased.to(train.y.device))
    return Setup(
        k,
        in_channels,
        judge,
        judge_s,
        sum(judge_acc.values()) / k,
        original,
        ddpm_s,
        real_feats,
        Subset(train.x[forget_mask], train.y[forget_mask]),
        Subset(train.x[~forget_mask], train.y[~forget_mask]),
    )


def unlearn_method(cfg: Config, st: Setup, method: str, unlearn_seed: int = 0, recipe=None, snapshots=()):
    """One method (or report row: ``PER_CLASS_ROW`` is MUNBa with one player per erased class)
    on the shared setup; the unlearning streams depend on ``unlearn_seed`` only."""
    players = "per-class" if method == PER_CLASS_ROW else "merged"
    return ddpm.unlearn_class(
        "MUNBa" if method == PER_CLASS_ROW else method,
        st.original,
        st.forget,
        st.retain,
        num_classes=st.num_classes,
        anchor_class=_anchor(cfg),
        batch_size=cfg.unlearn_batch_size,
        class_dropout=cfg.class_dropout,
        recipe=recipe or cfg.unlearning_recipe(),
        esd_eta=cfg.esd_eta,
        seed=cfg.seed + 1000 * unlearn_seed,
        snapshots=snapshots,
        players=players,
        progress=cfg.progress,
    )


def method_row(result) -> dict:
    """What results.json records of a run besides its generation scores."""
    clip = result.settings["max_grad_norm"]
    row = {
        "seconds": result.seconds,
        "settings": result.settings,
        "clipped_steps": 0.0
        if clip is None
        else 100.0 * sum(r > clip for r, _ in result.step_norms) / len(result.step_norms),
    }
    if result.power_ratios:
        row["final_power_ratio"] = result.power_ratios[-1]
    return row


def run_seed(cfg: Config, st: Setup, u: int, retrain=None):
    """Every method for unlearning seed ``u``: (rows, panels, losses, bargain traces by MUNBa
    row: {"players", "columns", "steps"}, relearn)."""
    k = st.num_classes
    rows, panels, traces, losses = {}, {}, {}, {}
    rows["Original"], panels["Original"] = evaluate_generator(
        cfg, st.original, st.judge, k, st.real_feats, "Original", u
    )
    rows["Original"]["seconds"] = st.ddpm_seconds
    models = {"Original": st.original}
    for method in cfg.rows():
        result = unlearn_method(cfg, st, method, u)
        rows[method], panels[method] = evaluate_generator(cfg, result.model, st.judge, k, st.real_feats, method, u)
        rows[method].update(method_row(result))
        losses[method] = result.losses
        models[method] = result.model
        if result.bargain_log:
            players = result.settings.get("players", ["forget", "preserve"])
            traces[method] = {
                "players": players,
                "columns": ddpm.trace_columns(players),
                "steps": result.bargain_log,
            }
    relearn = {}
    if retrain is not None:
        models["Retrain"] = retrain
        images = Subset(st.forget.x[: cfg.relearn_images], st.forget.y[: cfg.relearn_images])
        for name, model in models.items():
            relearn[name] = relearn_generator(cfg, model, st.judge, images, k, u)
            print(f"  relearn {name:8s} forget recognition {relearn[name]['forget_recognition']}")
    return rows, panels, losses, traces, relearn


def run(cfg: Config, ds: datasets.ImageData | None = None) -> dict:
    """The class-conditional run (``ds``: the loaded data, default: load ``cfg.dataset``):
    (results, panels of seed 0, bargain traces of seed 0 by MUNBa row)."""
    st = setup(cfg, ds)
    if len(cfg.forget_classes) > 1:
        print(RELEARN_SEVERAL)
    retrain = None
    if cfg.relearn:
        retrain, retrain_s = pretrained_ddpm(
            cfg, st.retain, st.in_channels, st.num_classes, kind="ddpm-retrain"
        )
        print(f"Retrain DDPM ready ({retrain_s:.0f}s training)")
    per_seed, relearn_seeds = [], []
    for u in range(cfg.seeds):
        rows, p, losses_u, traces_u, relearn_u = run_seed(cfg, st, u, retrain)
        if u == 0:
            panels, losses, traces = p, losses_u, traces_u
        per_seed.append(rows)
        relearn_seeds.append(relearn_u)
    from .classify import aggregate

    methods = aggregate(per_seed)
    for row in methods.values():  # per-class accuracies: the mean is enough next to per_seed
        row.pop("per_class_accuracy", None)
    relearn = {}
    for name in relearn_seeds[0]:
        curves = [r[name]["forget_recognition"] for r in relearn_seeds]
        relearn[name] = {
            "images": relearn_seeds[0][name]["images"],
            "steps": relearn_seeds[0][name]["steps"],
            "forget_recognition": [statistics.fmean(c) for c in zip(*curves)],
            "std": [statistics.stdev(c) if len(c) > 1 else 0.0 for c in zip(*curves)],
            "per_seed": curves,
        }
    config = asdict(cfg)
    config.update(judge_test_accuracy=st.judge_accuracy, judge_seconds=st.judge_seconds, ddpm_seconds=st.ddpm_seconds)
    results = {"config": config, "methods": methods, "losses": losses, "relearn": relearn}
    if len(cfg.forget_classes) == 1:
        config["forget_class"] = cfg.forget_class  # the one-class spelling results.json always had
    else:
        results["relearn_skipped"] = RELEARN_SEVERAL
        results["paired"] = paired_rows(per_seed, cfg.rows())
    return results, panels, traces


#: What the paired per-seed comparison of several erased classes covers.
PAIRED_METRICS = ("forget_recognition", "forget_spread", "retain_accuracy", "feature_distance")


def paired_rows(per_seed: list[dict], rows: list[str]) -> dict:
    """Per seed, "MUNBa per-class" (else MUNBa) minus each other two-objective row, per
    metric: {"A − B": {metric: study.paired(...)}} (its "wins" counts negative differences;
    for retain_accuracy a positive one is the better)."""
    from .study import paired

    mine = PER_CLASS_ROW if PER_CLASS_ROW in rows else "MUNBa"
    others = [r for r in ("MUNBa", "Naive") if r in rows and r != mine]
    if mine not in rows:
        return {}
    out = {}
    for other in others:
        out[f"{mine} − {other}"] = {
            m: paired([s[mine][m] for s in per_seed], [s[other][m] for s in per_seed]) for m in PAIRED_METRICS
        }
    return out


def relearn_generator(cfg: Config, model, judge, images: Subset, num_classes: int, unlearn_seed: int = 0) -> dict:
    """Forget recognition of the forget class's generations along the relearning attack."""
    labels = torch.full((cfg.samples_per_class,), cfg.forget_class, device=cfg.device)
    steps, recognition = [], []
    for step, relearned in ddpm.relearn_checkpoints(
        model,
        images,
        steps=cfg.relearn_steps,
        every=cfg.relearn_every,
        lr=cfg.relearn_lr,
        batch_size=min(cfg.unlearn_batch_size, len(images)),
        seed=cfg.seed + 777 + unlearn_seed,  # the same stream for every model
    ):
        samples = ddpm.sample(
            relearned,
            labels,
            null_class=num_classes,
            steps=cfg.sample_steps,
            guidance=cfg.guidance,
            seed=cfg.seed + 4242 + unlearn_seed,
        )
        steps.append(step)
        recognition.append(accuracy(predict(judge, samples.to(cfg.device)), labels.cpu()))
    return {"images": len(images), "steps": steps, "forget_recognition": recognition}


def report_columns(cfg: Config) -> tuple[str, ...]:
    """The Markdown table's columns: several erased classes add each one's recognition and the spread."""
    if len(cfg.forget_classes) == 1:
        return REPORT_COLUMNS
    each = tuple(f"forget_recognition_{c}" for c in cfg.forget_classes)
    return ("forget_recognition", *each, "forget_spread", *REPORT_COLUMNS[1:])


def _paired_markdown(paired: dict) -> str:
    lines = [
        "",
        "Paired per seed (difference of the first row minus the second; mean ± std, "
        "first-row wins/seeds, paired t-test p; a win is a lower value except for retain_accuracy):",
        "",
        "| comparison | " + " | ".join(PAIRED_METRICS) + " |",
        "|---|" + "---:|" * len(PAIRED_METRICS),
    ]
    for name, metrics in paired.items():
        cells = []
        for m in PAIRED_METRICS:
            p = metrics[m]
            wins = p["n"] - p["wins"] - sum(d == 0 for d in p["diff"]) if m == "retain_accuracy" else p["wins"]
            pv = "" if p["p"] is None else f", p={p['p']:.2f}"
            d = 3 if m == "feature_distance" else 2
            cells.append(f"{p['mean']:+.{d}f} ± {p['std']:.{d}f} ({wins}/{p['n']}{pv})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(cfg: Config, results: dict, panels: dict, traces: dict, class_names) -> str:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    fc = cfg.forget_classes
    if len(fc) == 1:
        erased = f"erase class {cfg.forget_class} ({class_names[cfg.forget_class]}) → anchor {cfg.anchor_class}"
    else:
        erased = "erase classes " + ", ".join(
            f"{c} ({class_names[c]}) → {a}" for c, a in zip(fc, cfg.anchor_classes)
        )
    title = (
        f"{cfg.dataset}, {erased}; {cfg.samples_per_class} samples/class, judge accuracy "
        f"{results['config']['judge_test_accuracy']:.1f}%"
    )
    table = markdown_table(results["methods"], report_columns(cfg), title)
    several = (
        ""
        if len(fc) == 1
        else "forget_recognition is the mean over the erased classes, forget_recognition_C each one's, "
        "forget_spread their max − min (↓: no class left un-forgotten); "
        + (
            f"MUNBa bargains 2 players (the erased classes' forget losses merged, preserve), {PER_CLASS_ROW} "
            f"{len(fc) + 1} (one per erased class, preserve); "
            if cfg.players == "per-class"
            else ""
        )
    )
    table += (
        "\nforget_recognition: % of forget-class generations the judge labels as that class (↓); "
        + several
        + "retain_accuracy: mean judge accuracy on the retained classes' generations (↑); "
        "feature_distance: KID on judge features, retain generations vs real retain test images (↓); "
        "seconds: DDPM pre-training for Original, unlearning otherwise.\n"
    )
    if results.get("paired"):
        table += _paired_markdown(results["paired"])
    if results.get("relearn_skipped"):
        table += f"\n{results['relearn_skipped'][0].upper()}{results['relearn_skipped'][1:]}.\n"
    (out / "results.md").write_text(table)
    shown = {name: imgs[:, :GRID_SAMPLES] for name, imgs in panels.items()}
    save_sample_grid(shown, out / "samples.png", [f"{i} {n}" for i, n in enumerate(class_names)], title)
    if traces:
        (out / "munba_bargain.json").write_text(json.dumps(traces))
    for row, trace in traces.items():
        two = row == "MUNBa" and len(fc) == 1
        plot_bargain_trace(
            trace["steps"],
            out / ("munba_bargain.png" if row == "MUNBa" else "munba_bargain_per_class.png"),
            f"{row} bargaining weights and cos φ",
            None if two else trace["players"],
        )
    if results.get("relearn"):
        curves = {
            name: {f"{c['images']} forget images": {"steps": c["steps"], "forget_acc": c["forget_recognition"]}}
            for name, c in results["relearn"].items()
        }
        plot_relearn(
            curves,
            out / "relearn.png",
            f"relearning attack: {title}",
            ylabel="forget-class generations recognised (%)",
        )
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    cfg = parse_args(argv, parser)
    with options.usage_errors(parser):
        ds = check_before_work(cfg)
    if cfg.pretrained is not None:
        from .stable_diffusion import run_stable_diffusion

        return run_stable_diffusion(cfg)
    results, panels, traces = run(cfg, ds)
    k = len(panels["Original"])
    names = FASHION_MNIST_CLASSES if cfg.dataset == "fashion_mnist" else [str(i) for i in range(k)]
    table = write_report(cfg, results, panels, traces, names)
    print("\n" + table)
    plots = ["munba_bargain.png" if r == "MUNBa" else "munba_bargain_per_class.png" for r in traces]
    print(
        f"wrote {Path(cfg.out) / 'results.json'}, results.md, samples.png"
        + "".join(f", {p}" for p in plots)
        + (", munba_bargain.json" if traces else "")
    )
    return results


if __name__ == "__main__":
    main()
