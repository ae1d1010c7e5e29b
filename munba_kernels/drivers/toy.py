"""A self-contained unlearning example on generated data (seconds on a CPU).

A small MLP learns to classify Gaussian clusters; then one class is forgotten, once with
MUNBa and once with the naive summed gradient, both from the same original model with
the same data order.  The forget loss is cross-entropy against random labels (as in the
published MUNBa classification recipe), the preserve loss cross-entropy on retain data.

    python -m munba_kernels.drivers.toy [--steps 150] [--forget-class 0] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from munba_kernels import MUNBaOptimizer
from munba_kernels.evaluation import accuracy, true_class_confidence

from . import options
from .unlearning import random_labels


@dataclass
class ToyProblem:
    """Train/test splits of clustered data plus the index of the class to forget."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    forget_class: int
    num_classes: int

    def split(self, x: torch.Tensor, y: torch.Tensor):
        mask = y == self.forget_class
        return (x[mask], y[mask]), (x[~mask], y[~mask])


def make_problem(
    num_classes: int = 10, dim: int = 16, per_class: int = 200, forget_class: int = 0, seed: int = 0
) -> ToyProblem:
    """Gaussian clusters around random centres; overlap keeps the task non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen) * 1.5

    def sample(n):
        y = torch.arange(num_classes).repeat_interleave(n)
        x = centres[y] + torch.randn(len(y), dim, generator=gen)
        return x, y

    x_train, y_train = sample(per_class)
    x_test, y_test = sample(per_class // 2)
    return ToyProblem(x_train, y_train, x_test, y_test, forget_class, num_classes)


def make_model(dim: int, num_classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, num_classes)
    )


def train_original(problem: ToyProblem, epochs: int = 30, seed: int = 0) -> nn.Module:
    model = make_model(problem.x_train.shape[1], problem.num_classes, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(problem.y_train), generator=gen).split(128):
            opt.zero_grad()
            F.cross_entropy(model(problem.x_train[idx]), problem.y_train[idx]).backward()
            opt.step()
    return model


def unlearn(
    original: nn.Module,
    problem: ToyProblem,
    method: str,
    steps: int = 150,
    lr: float = 1e-3,
    seed: int = 0,
    log=None,
) -> nn.Module:
    """Forget ``problem.forget_class`` with ``method`` in {"munba", "naive"}; returns the model.

    Both methods see the same batches and the same AdamW settings; "naive" back-propagates
    the summed loss, MUNBa bargains between the two gradients.
    """
    model = copy.deepcopy(original)
    (xf, yf), (xr, yr) = problem.split(problem.x_train, problem.y_train)
    gen = torch.Generator().manual_seed(seed)
    if method == "munba":
        opt = MUNBaOptimizer(model.parameters(), lr=lr, weight_decay=0.0)
    elif method == "naive":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    else:
        raise ValueError(f"method must be 'munba' or 'naive', got {method!r}")
    for step in range(steps):
        fi = torch.randint(0, len(yf), (64,), generator=gen)
        ri = torch.randint(0, len(yr), (256,), generator=gen)
        targets = random_labels(yf[fi], problem.num_classes, gen)
        loss_f = F.cross_entropy(model(xf[fi]), targets)
        loss_r = F.cross_entropy(model(xr[ri]), yr[ri])
        opt.zero_grad()
        if method == "munba":
            loss_f.backward()
            opt.capture_forget()
            loss_r.backward()
        else:
            (loss_f + loss_r).backward()
        opt.step()
        if log is not None:
            log(step, method, loss_f.item(), loss_r.item(), getattr(opt, "last_bargain", None))
    return model


@torch.no_grad()
def evaluate(model: nn.Module, problem: ToyProblem) -> dict[str, float]:
    (xf, yf), (xr, yr) = problem.split(problem.x_train, problem.y_train)
    _, (xt, yt) = problem.split(problem.x_test, problem.y_test)
    forget_logits = model(xf)
    return {
        "forget_acc": accuracy(forget_logits, yf),
        # mean true-class probability, chance = 100/C
        "forget_confidence": 100.0 * true_class_confidence(forget_logits, yf).mean().item(),
        "retain_acc": accuracy(model(xr), yr),
        "test_acc": accuracy(model(xt), yt),
    }


def _print_step(step, method, loss_f, loss_r, bargain):
    if bargain is None:
        print(f"  [{method}] step {step:3d}  forget loss {loss_f:.4f}  preserve loss {loss_r:.4f}")
        return
    a_f, a_r = bargain.alpha.tolist()
    print(
        f"  [{method}] step {step:3d}  alpha_f {a_f:.4e}  alpha_r {a_r:.4e}  "
        f"cos {bargain.cos.item():+.4f}  forget loss {loss_f:.4f}  preserve loss {loss_r:.4f}"
    )


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=options.positive_int, default=150, help="unlearning steps per method")
    parser.add_argument("--forget-class", type=int, default=0)
    parser.add_argument("--lr", type=options.positive_float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="print only the summary table")
    args = parser.parse_args(argv)

    problem = make_problem(forget_class=args.forget_class, seed=args.seed)
    if not 0 <= args.forget_class < problem.num_classes:
        parser.error(f"--forget-class {args.forget_class} is outside 0..{problem.num_classes - 1}")
    original = train_original(problem, seed=args.seed)
    results = {"original": evaluate(original, problem)}
    for method in ("munba", "naive"):
        print(f"unlearning class {args.forget_class} with {method}:")
        model = unlearn(
            original,
            problem,
            method,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            log=None if args.quiet else _print_step,
        )
        results[method] = evaluate(model, problem)
    chance = 100.0 / problem.num_classes
    print(
        f"\n{'model':10s} {'forget acc':>11s} {'forget conf':>12s} {'retain acc':>11s} {'test acc':>9s}"
        f"   (chance {chance:.0f}%)"
    )
    for name, r in results.items():
        print(
            f"{name:10s} {r['forget_acc']:11.1f} {r['forget_confidence']:12.1f} "
            f"{r['retain_acc']:11.1f} {r['test_acc']:9.1f}"
        )
    return results


if __name__ == "__main__":
    main()
