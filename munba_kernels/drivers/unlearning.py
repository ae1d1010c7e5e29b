"""Classifier training and the unlearning methods compared by the classification driver.

Every method gets the same budget and data order: one *epoch* is one pass over the retain
set in seeded batches; methods that also use forget data draw a forget batch alongside,
sized so that the same epoch is also one pass over the forget set.  All methods use SGD
with momentum 0.9 and weight decay 5e-4 (the published MUNBa recipe) and differ only in
their loss and in how they combine gradients:

    FT        fine-tune on retain                       CE(retain)
    GA        gradient ascent on forget                 −CE(forget)
    RL        random labels, mixed with retain          CE(forget ∪ retain, random forget labels)
    NegGrad+  weighted ascent + descent, one backward   β·CE(retain) − (1−β)·CE(forget), β = 0.9
    Naive     MUNBa's two losses summed                 CE(forget, random labels) + CE(retain)
    MUNBa     the same two losses, Nash-bargained       MUNBaOptimizer.paper_faithful (clip ‖d‖ = 1)

Random labels are drawn uniformly over all classes at every step, as in the published
recipe.  Retrain (train from scratch on retain) is the gold standard, not a method here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from munba_kernels import MUNBaOptimizer

from . import parallel

METHODS = ("FT", "GA", "RL", "NegGrad+", "Naive", "MUNBa")
NEGGRAD_BETA = 0.9
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


@dataclass
class Subset:
    """Images and labels of one split, on the training device."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class UnlearningRun:
    model: nn.Module
    seconds: float
    bargain_log: list[tuple[float, float, float]] = field(default_factory=list)  # (α_f, α_r, cos) per step


def _batches(n: int, batch_size: int, gen: torch.Generator, device, world: int = 1) -> Iterator[Tensor]:
    """Seeded shuffled index batches.  A trailing batch that would leave a rank one sample is
    dropped (BatchNorm cannot normalise a single sample at 1×1 resolution)."""
    for idx in torch.randperm(n, generator=gen).to(device).split(batch_size):
        if len(idx) >= 2 * world or n == 1:
            yield idx


def train_classifier(
    model: nn.Module,
    data: Subset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    desc: str,
    progress: bool = True,
) -> nn.Module:
    """Plain supervised training (SGD, momentum, cosine schedule) with a progress bar."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True
    )
    steps = epochs * math.ceil(len(data) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    model.train()
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            for idx in _batches(len(data), batch_size, gen, data.x.device):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def random_labels(y: Tensor, num_classes: int, gen: torch.Generator) -> Tensor:
    """Labels drawn uniformly over all classes: the published recipe's forget targets."""
    return torch.randint(0, num_classes, y.shape, generator=gen).to(y.device)


def unlearn(
    method: str,
    model: nn.Module,
    forget: Subset,
    retain: Subset,
    *,
    num_classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
    ranks: parallel.Ranks = parallel.SINGLE_PROCESS,
) -> UnlearningRun:
    """Run ``method`` in place on ``model`` (a copy of the original); returns it with timing.

    Under torchrun (``ranks``), every rank draws the same batches and trains on its slice
    of each; the trained weights are complete on every rank afterwards.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    gen = torch.Generator().manual_seed(seed)
    device, world = retain.x.device, ranks.world
    plain, model = model, parallel.wrap(model, ranks)
    if method == "MUNBa":
        opt = MUNBaOptimizer.paper_faithful(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    log: list[Tensor] = []
    step_fn = _STEPS[method]

    if method == "GA":
        plan = [
            (None, idx)
            for _ in range(epochs)
            for idx in _batches(len(forget), batch_size, gen, device, world)
        ]
    elif method == "RL":
        union = Subset(torch.cat([forget.x, retain.x]), torch.cat([forget.y, retain.y]))
        plan = [
            (idx, None) for _ in range(epochs) for idx in _batches(len(union), batch_size, gen, device, world)
        ]
    else:
        plan = list(
            _paired_batches(len(retain), len(forget), batch_size, epochs, gen, device, method != "FT", world)
        )

    model.train()
    start = time.perf_counter()
    for r_idx, f_idx in tqdm(
        plan, desc=f"{method} lr={lr:g}", unit="step", disable=not progress, leave=False
    ):
        if method == "RL":
            is_forget = r_idx < len(forget)
            labels = torch.where(is_forget, random_labels(union.y[r_idx], num_classes, gen), union.y[r_idx])
            step_fn(model, opt, None, ranks.local(Subset(union.x[r_idx], labels)))
        else:
            fb = None if f_idx is None else Subset(forget.x[f_idx], forget.y[f_idx])
            rb = None if r_idx is None else Subset(retain.x[r_idx], retain.y[r_idx])
            if fb is not None and method in ("Naive", "MUNBa"):
                fb = Subset(fb.x, random_labels(fb.y, num_classes, gen))
            step_fn(model, opt, ranks.local(fb), ranks.local(rb))
        if method == "MUNBa":
            b = opt.last_bargain
            log.append(torch.cat([b.alpha, b.cos[None]]).float())
    seconds = time.perf_counter() - start
    bargain_log = [tuple(row) for row in torch.stack(log).tolist()] if log else []
    return UnlearningRun(parallel.unwrap(model, plain, ranks).eval(), seconds, bargain_log)


def _paired_batches(n_retain, n_forget, batch_size, epochs, gen, device, with_forget, world=1) -> Iterator:
    """Retain batches of ``batch_size``; forget batches sized so both sets are covered per epoch."""
    steps = math.ceil(n_retain / batch_size)
    f_size = max(2 * world, math.ceil(n_forget / steps))
    for _ in range(epochs):
        forget_iter = iter(_batches(n_forget, f_size, gen, device, world)) if with_forget else None
        for r_idx in _batches(n_retain, batch_size, gen, device, world):
            f_idx = None
            if forget_iter is not None:
                f_idx = next(forget_iter, None)
                if f_idx is None:  # rounding left the forget pass one batch short: start another
                    forget_iter = iter(_batches(n_forget, f_size, gen, device, world))
                    f_idx = next(forget_iter)
            yield r_idx, f_idx


def _ce(model, batch: Subset) -> Tensor:
    return F.cross_entropy(model(batch.x), batch.y)


def _single_loss_step(loss_fn: Callable) -> Callable:
    def step(model, opt, fb, rb):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, fb, rb).backward()
        opt.step()

    return step


def _munba_step(model, opt: MUNBaOptimizer, fb: Subset, rb: Subset) -> None:
    opt.zero_grad(set_to_none=True)
    _ce(model, fb).backward()
    opt.capture_forget()
    _ce(model, rb).backward()
    opt.step()


_STEPS = {
    "FT": _single_loss_step(lambda m, fb, rb: _ce(m, rb)),
    "GA": _single_loss_step(lambda m, fb, rb: -_ce(m, fb)),
    "RL": _single_loss_step(lambda m, fb, rb: _ce(m, rb)),
    "NegGrad+": _single_loss_step(
        lambda m, fb, rb: NEGGRAD_BETA * _ce(m, rb) - (1 - NEGGRAD_BETA) * _ce(m, fb)
    ),
    "Naive": _single_loss_step(lambda m, fb, rb: _ce(m, fb) + _ce(m, rb)),
    "MUNBa": _munba_step,
}


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    model.eval()
    if len(x) == 0:
        return torch.empty(0, 0)
    return torch.cat([model(chunk).float().cpu() for chunk in x.split(batch_size)])
