"""Evaluating a class-conditional generator without downloaded weights.

A classifier trained by the project on the real data (the *judge*) labels generated images:

* forget recognition: share of generations for the forgotten class that the judge still
  calls that class (lower is better; UA = 100 − it);
* per-class accuracy of the retained classes' generations (does the model still draw them?);
* a distribution distance between generations and real data on the judge's penultimate
  features: KID, the unbiased squared MMD with the cubic polynomial kernel
  k(x, y) = (x·y / d + 1)³ (Bińkowski et al., 2018).  Unlike the Fréchet distance it has
  no bias that depends on the sample size, so a few hundred samples per model compare fairly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from .metrics import accuracy


def kernel_inception_distance(x: Tensor, y: Tensor, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD² between feature sets ``x`` [n, d] and ``y`` [m, d] (float64, cubic kernel).

    Can be slightly negative for samples of one distribution (it is unbiased, not clipped).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be [n, d] and [m, d] feature matrices, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"kernel_inception_distance needs at least 2 rows in x and y, got {n} and {m}")
    x, y = x.double(), y.double()
    dim = x.shape[1]

    def k(a, b):
        return (a @ b.T / dim + coef0) ** degree

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return (within_x + within_y - 2 * kxy.mean()).item()


def generation_scores(logits: Tensor, labels: Tensor, forget_class: int) -> dict:
    """Judge verdicts on generations conditioned on ``labels``: percentages in [0, 100].

    ``retain_accuracy`` is the mean of the retained classes' accuracies (each class counts
    once, however many samples it has); ``per_class`` holds every class's accuracy.
    """
    if len(logits) != len(labels):
        raise ValueError(f"logits and labels differ in length: {len(logits)} vs {len(labels)}")
    classes = sorted(int(c) for c in labels.unique())
    if forget_class not in classes:
        raise ValueError(f"forget_class {forget_class} has no generations among classes {classes}")
    per_class = {c: accuracy(logits[labels == c], labels[labels == c]) for c in classes}
    retained = [per_class[c] for c in classes if c != forget_class]
    return {
        "forget_recognition": per_class[forget_class],
        "retain_accuracy": sum(retained) / len(retained) if retained else 0.0,
        "per_class": per_class,
    }


def save_sample_grid(
    panels: Mapping[str, Tensor], path: str | Path, row_names: Sequence[str], title: str = ""
) -> None:
    """One panel per model (side by side); each panel has a row of samples per class.

    ``panels[name]`` is [classes, samples, C, H, W] in [0, 1].
    """
    from torchvision.utils import make_grid

    from .report import _pyplot

    plt = _pyplot()
    names = list(panels)
    fig, axes = plt.subplots(
        1, len(names), figsize=(3.2 * len(names), 0.35 * len(row_names) + 1.2), squeeze=False
    )
    for ax, name in zip(axes[0], names):
        imgs = panels[name]
        k, n = imgs.shape[:2]
        grid = make_grid(imgs.reshape(k * n, *imgs.shape[2:]), nrow=n, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
        ax.set_xticks([])
        step = grid.shape[1] / k
        ax.set_yticks([step * (i + 0.5) for i in range(k)], list(row_names)[:k], fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
