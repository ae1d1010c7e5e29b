"""Diffusion unlearning: erase one class from a class-conditional DDPM with MUNBa and baselines.

    python -m munba_kernels.drivers.diffusion --dataset fashion_mnist --forget-class 3 \\
        --methods all --device cpu --out runs/diffusion [--quick]

Embedded default (CPU, offline): train a small class-conditional DDPM (diffusers UNet2DModel,
class dropout for classifier-free guidance) and a judge classifier (narrow ResNet) on the
dataset at --image-size, both cached; unlearn --forget-class with MUNBa, Naive (the same two
losses summed) and ESD (negative guidance); generate --samples-per-class DDIM samples per
class from every model with the same initial noise; let the judge label them.  Reports, per
model: forget_recognition (% of forget-class generations the judge calls that class; UA =
100 − it), retain_accuracy (mean judge accuracy over the retained classes' generations) and
feature_distance (KID on judge features: retain generations vs real retain test images).
Writes results.json, results.md, samples.png (rows = classes, one panel per model) and
munba_bargain.png to --out.  Losses and methods: munba_kernels/drivers/ddpm.py.

Stable Diffusion (GPU users): --pretrained DIR (a local StableDiffusionPipeline folder)
--forget-prompt "..." --anchor-prompt "..." fine-tunes the UNet with MUNBa to erase the
concept and saves the pipeline to OUTDIR/pipeline (munba_kernels/drivers/stable_diffusion.py).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from munba_kernels.evaluation import generation_scores, kernel_inception_distance, penultimate_features
from munba_kernels.evaluation.generation import save_sample_grid
from munba_kernels.evaluation.report import markdown_table, plot_bargain_trace

from . import data as datasets
from . import ddpm, options
from .cache import cache_path, default_cache_dir, fingerprint, load_entry, save_atomic
from .models import build_model, classifier_head
from .unlearning import Subset, predict, train_classifier

#: Part of every cache key: bump it when the DDPM or judge training code changes.
CACHE_VERSION = 1
GRID_SAMPLES = 8  # samples per class shown in samples.png
REPORT_COLUMNS = ("forget_recognition", "UA", "retain_accuracy", "feature_distance", "seconds")
FASHION_MNIST_CLASSES = (
    "T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"
)  # fmt: skip


@dataclass
class Config:
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    forget_class: int = 3
    anchor_class: int | None = None  # default: the next class (ddpm.default_anchor)
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
    sample_steps: int = 25
    guidance: float = 2.0
    samples_per_class: int = 100
    seed: int = 0
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
    p.add_argument("--forget-class", type=int, default=d.forget_class)
    p.add_argument(
        "--anchor-class",
        type=int,
        default=None,
        help="class the forget class is mapped to (default: the next one)",
    )
    methods = ", ".join(ddpm.UNLEARN_METHODS)
    p.add_argument("--methods", default="all", help=f"'all' or a comma list of {methods}")
    p.add_argument("--image-size", type=positive_int, default=d.image_size, help="DDPM resolution")
    p.add_argument("--ddpm-steps", type=positive_int, default=d.ddpm_steps, help="pre-training steps")
    p.add_argument("--unlearn-steps", type=positive_int, default=d.unlearn_steps)
    p.add_argument("--unlearn-lr", type=positive_float, default=d.unlearn_lr, help="AdamW, every method")
    p.add_argument(
        "--esd-eta", type=options.finite_float, default=d.esd_eta, help="ESD negative-guidance strength"
    )
    p.add_argument("--sample-steps", type=positive_int, default=d.sample_steps, help="DDIM steps")
    p.add_argument(
        "--guidance", type=options.finite_float, default=d.guidance, help="classifier-free guidance scale"
    )
    p.add_argument("--samples-per-class", type=positive_int, default=d.samples_per_class)
    p.add_argument("--seed", type=int, default=d.seed)
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
    sd.add_argument("--sd-inference-steps", type=positive_int, default=d.sd_inference_steps)
    return p


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Config:
    """The command line as a Config; a bad value exits through ``parser.error`` (one line, code 2).
    Checks that need the data or the file system are :func:`check_before_work`'s."""
    p = parser or build_parser()
    a = p.parse_args(argv)
    chosen = options.method_list(p, a.methods, ddpm.UNLEARN_METHODS)
    if a.pretrained is not None and (not a.forget_prompt or a.anchor_prompt is None):
        p.error("--pretrained needs at least one --forget-prompt and an --anchor-prompt")
    if a.pretrained is None:
        options.check_data_dir(p, a.dataset, a.data_dir)
        sd_only = {"--forget-prompt": a.forget_prompt, "--retain-prompt": a.retain_prompt}
        given = [o for o, v in {**sd_only, "--anchor-prompt": a.anchor_prompt}.items() if v]
        if given:
            p.error(f"{', '.join(given)}: only for Stable Diffusion, which needs --pretrained DIR")
    cfg = Config(
        dataset=a.dataset,
        data_dir=a.data_dir,
        forget_class=a.forget_class,
        anchor_class=a.anchor_class,
        methods=chosen,
        image_size=a.image_size,
        ddpm_steps=a.ddpm_steps,
        unlearn_steps=a.unlearn_steps,
        unlearn_lr=a.unlearn_lr,
        esd_eta=a.esd_eta,
        sample_steps=a.sample_steps,
        guidance=a.guidance,
        samples_per_class=a.samples_per_class,
        seed=a.seed,
        device=a.device,
        out=a.out,
        cache_dir=a.cache_dir,
        quick=a.quick,
        progress=not a.no_progress,
        pretrained=a.pretrained,
        forget_prompts=a.forget_prompt,
        anchor_prompt=a.anchor_prompt,
        retain_prompts=a.retain_prompt,
        sd_train=a.sd_train,
        sd_steps=a.sd_steps,
        sd_lr=a.sd_lr,
        sd_images=a.sd_images,
        sd_inference_steps=a.sd_inference_steps,
    )
    if cfg.quick:
        cfg.ddpm_steps, cfg.unlearn_steps = min(cfg.ddpm_steps, 200), min(cfg.unlearn_steps, 20)
        cfg.judge_epochs, cfg.judge_train_size = 2, min(cfg.judge_train_size, 2000)
        cfg.samples_per_class, cfg.sample_steps = min(cfg.samples_per_class, 8), min(cfg.sample_steps, 10)
        cfg.channels = [16, 32]
    halvings = len(cfg.channels) - 1  # the UNet's down-sampling steps (ddpm.build_unet)
    if cfg.pretrained is None and cfg.image_size % 2**halvings:
        p.error(f"--image-size {cfg.image_size}: must be divisible by {2**halvings} (the UNet halves it)")
    return cfg


def _check_classes(cfg: Config, num_classes: int) -> None:
    if not 0 <= cfg.forget_class < num_classes:
        raise options.OptionError(f"--forget-class {cfg.forget_class} is outside 0..{num_classes - 1}")
    if cfg.anchor_class is None:
        cfg.anchor_class = ddpm.default_anchor(cfg.forget_class, num_classes)
    if not 0 <= cfg.anchor_class < num_classes or cfg.anchor_class == cfg.forget_class:
        raise options.OptionError(
            f"--anchor-class {cfg.anchor_class} must be a class in 0..{num_classes - 1} other than the forget class"
        )


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


def pretrained_ddpm(cfg: Config, train: Subset, in_channels: int, num_classes: int):
    key = {
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "steps": cfg.ddpm_steps,
        "batch_size": cfg.ddpm_batch_size,
        "lr": cfg.ddpm_lr,
        "class_dropout": cfg.class_dropout,
        "ema_decay": cfg.ema_decay,
        "n": len(train),
    }
    return _cached(
        cfg,
        "ddpm",
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
    cfg: Config, model, judge, num_classes: int, real_retain_feats: torch.Tensor, name: str
):
    """Samples for every class (same noise for every model), judged; returns (row, samples [K, n, ...])."""
    labels = torch.arange(num_classes).repeat_interleave(cfg.samples_per_class)
    images = ddpm.sample(
        model,
        labels.to(cfg.device),
        null_class=num_classes,
        steps=cfg.sample_steps,
        guidance=cfg.guidance,
        seed=cfg.seed + 12345,  # fixed and unrelated to the training streams
        progress=cfg.progress,
    )
    logits = predict(judge, images.to(cfg.device))
    scores = generation_scores(logits, labels, cfg.forget_class)
    retain = labels != cfg.forget_class
    feats = penultimate_features(judge, classifier_head(judge), images[retain].to(cfg.device))
    row = {
        "forget_recognition": scores["forget_recognition"],
        "UA": 100.0 - scores["forget_recognition"],
        "retain_accuracy": scores["retain_accuracy"],
        "feature_distance": kernel_inception_distance(feats, real_retain_feats),
        "per_class_accuracy": scores["per_class"],
    }
    print(
        f"  {name:8s} forget recognition {row['forget_recognition']:6.2f}%  retain accuracy "
        f"{row['retain_accuracy']:6.2f}%  KID {row['feature_distance']:.4f}"
    )
    return row, images.reshape(num_classes, cfg.samples_per_class, *images.shape[1:])


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


def run(cfg: Config, ds: datasets.ImageData | None = None) -> dict:
    """The class-conditional run (``ds``: the loaded data, default: load ``cfg.dataset``)."""
    if ds is None:
        ds = datasets.load_dataset(cfg.dataset, cfg.data_dir)
        _check_classes(cfg, ds.num_classes)
    k, in_channels, dev = ds.num_classes, ds.image_shape[0], torch.device(cfg.device)
    order = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(0))
    train = Subset(ddpm.to_model_range(ds.x_train[order], cfg.image_size).to(dev), ds.y_train[order].to(dev))
    test_x = (ddpm.to_model_range(ds.x_test, cfg.image_size) + 1) / 2
    print(
        f"{cfg.dataset}: {len(train)} training images at {cfg.image_size}×{cfg.image_size}; forget class "
        f"{cfg.forget_class}, anchor class {cfg.anchor_class}; methods {', '.join(cfg.methods)}"
    )
    judge, judge_s = judge_classifier(cfg, train, in_channels, k)
    judge_acc = generation_scores(predict(judge, test_x.to(dev)), ds.y_test, cfg.forget_class)["per_class"]
    print(f"judge accuracy on real test images: {sum(judge_acc.values()) / k:.2f}% ({judge_s:.0f}s training)")
    original, ddpm_s = pretrained_ddpm(cfg, train, in_channels, k)
    print(f"DDPM ready ({ddpm_s:.0f}s training)")

    # Real retain test images for KID: as many as the retain generations, a fixed subset.
    real = test_x[ds.y_test != cfg.forget_class]
    real = real[
        torch.randperm(len(real), generator=torch.Generator().manual_seed(1))[
            : (k - 1) * cfg.samples_per_class
        ]
    ]
    real_feats = penultimate_features(judge, classifier_head(judge), real.to(dev))

    forget_mask = train.y == cfg.forget_class
    forget, retain = (
        Subset(train.x[forget_mask], train.y[forget_mask]),
        Subset(train.x[~forget_mask], train.y[~forget_mask]),
    )
    rows, panels, trace, losses = {}, {}, [], {}
    rows["Original"], panels["Original"] = evaluate_generator(cfg, original, judge, k, real_feats, "Original")
    rows["Original"]["seconds"] = ddpm_s
    for method in cfg.methods:
        result = ddpm.unlearn_class(
            method,
            original,
            forget,
            retain,
            num_classes=k,
            anchor_class=cfg.anchor_class,
            steps=cfg.unlearn_steps,
            batch_size=cfg.unlearn_batch_size,
            lr=cfg.unlearn_lr,
            class_dropout=cfg.class_dropout,
            esd_eta=cfg.esd_eta,
            seed=cfg.seed,
            progress=cfg.progress,
        )
        rows[method], panels[method] = evaluate_generator(cfg, result.model, judge, k, real_feats, method)
        rows[method]["seconds"] = result.seconds
        losses[method] = result.losses
        if method == "MUNBa":
            trace = result.bargain_log
    config = asdict(cfg)
    config.update(judge_test_accuracy=sum(judge_acc.values()) / k, judge_seconds=judge_s, ddpm_seconds=ddpm_s)
    return {"config": config, "methods": rows, "losses": losses}, panels, trace


def write_report(cfg: Config, results: dict, panels: dict, trace: list, class_names) -> str:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    title = (
        f"{cfg.dataset}, erase class {cfg.forget_class} ({class_names[cfg.forget_class]}) → anchor "
        f"{cfg.anchor_class}; {cfg.samples_per_class} samples/class, judge accuracy "
        f"{results['config']['judge_test_accuracy']:.1f}%"
    )
    table = markdown_table(results["methods"], REPORT_COLUMNS, title)
    table += (
        "\nforget_recognition: % of forget-class generations the judge labels as that class (↓); "
        "retain_accuracy: mean judge accuracy on the retained classes' generations (↑); "
        "feature_distance: KID on judge features, retain generations vs real retain test images (↓); "
        "seconds: DDPM pre-training for Original, unlearning otherwise.\n"
    )
    (out / "results.md").write_text(table)
    shown = {name: imgs[:, :GRID_SAMPLES] for name, imgs in panels.items()}
    save_sample_grid(shown, out / "samples.png", [f"{i} {n}" for i, n in enumerate(class_names)], title)
    if trace:
        plot_bargain_trace(trace, out / "munba_bargain.png", "MUNBa bargaining weights and cos φ")
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    cfg = parse_args(argv, parser)
    with options.usage_errors(parser):
        ds = check_before_work(cfg)
    if cfg.pretrained is not None:
        from .stable_diffusion import run_stable_diffusion

        return run_stable_diffusion(cfg)
    results, panels, trace = run(cfg, ds)
    k = len(results["methods"]["Original"]["per_class_accuracy"])
    names = FASHION_MNIST_CLASSES if cfg.dataset == "fashion_mnist" else [str(i) for i in range(k)]
    table = write_report(cfg, results, panels, trace, names)
    print("\n" + table)
    print(
        f"wrote {Path(cfg.out) / 'results.json'}, results.md, samples.png"
        + (", munba_bargain.png" if trace else "")
    )
    return results


if __name__ == "__main__":
    main()
