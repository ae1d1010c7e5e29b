"""Classifier training and the unlearning methods compared by the classification driver.

Every method gets the same budget and data order: one *epoch* is one pass over the retain
set in seeded batches; methods that also use forget data draw a forget batch alongside,
sized so that the same epoch is also one pass over the forget set.  Every method's
optimizer is built from one :class:`Recipe` (base rule, momentum, weight decay, clip,
epochs), so the methods differ only in their losses and in how they combine gradients:

    FT        fine-tune on retain                       CE(retain)
    GA        gradient ascent on forget                 −CE(forget)
    RL        random labels, mixed with retain          CE(forget ∪ retain, random forget labels)
    NegGrad+  weighted ascent + descent, one backward   β·CE(retain) − (1−β)·CE(forget), β from a grid
    Naive     MUNBa's two losses summed                 CE(forget, random labels) + CE(retain)
    MUNBa     the same two losses, Nash-bargained       MUNBaOptimizer (the published recipe)
    MUNBa-GA  NegGrad+'s two losses, Nash-bargained     −CE(forget) and CE(retain)

Naive/MUNBa and NegGrad+/MUNBa-GA are the pairs that isolate bargaining: the same two
losses, the same optimizer and clip, combined by a sum or by the Nash bargain.

Several forget classes (``forget_groups``): a MUNBa method may bargain one forget player per
class plus the preserve player (K = classes + 1) instead of one merged forget player.  The
step's forget batch and its random labels are the merged run's, split by true class, so the
two runs see the same data; only how the classes' gradients are combined differs.

The clip (``Recipe.max_grad_norm``) bounds the norm of whatever direction a method hands
to the base rule: MUNBa's ‖d‖ (clipped inside the optimizer, exactly, at no extra pass),
the summed gradient of Naive/NegGrad+, and the single gradient of FT/GA/RL.  The
published recipe clips MUNBa's step to 1; comparing it with an unclipped sum would
measure the clip, not the bargaining, so every method gets the same clip (exact, like
MUNBa's: no ``+1e-6``).

Random labels are drawn uniformly over all classes at every step, as in the published
recipe; Naive and MUNBa draw the same labels.  Retrain (train from scratch on retain) is
the gold standard, not a method here.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from munba_kernels import MUNBaOptimizer
from munba_kernels.bargaining import validate_power

from . import parallel

METHODS = ("FT", "GA", "RL", "NegGrad+", "Naive", "MUNBa", "MUNBa-GA")
#: Methods that combine a forget and a preserve objective; the fairness contract binds them.
TWO_OBJECTIVE = ("NegGrad+", "Naive", "MUNBa", "MUNBa-GA")
#: The forget loss each method uses (``None``: no forget loss).
FORGET_LOSS = {
    "FT": None,
    "GA": "gradient_ascent",
    "RL": "random_labels",
    "NegGrad+": "gradient_ascent",
    "Naive": "random_labels",
    "MUNBa": "random_labels",
    "MUNBa-GA": "gradient_ascent",
}
NEGGRAD_BETA = 0.9
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


@dataclass(frozen=True)
class Recipe:
    """The optimizer settings every unlearning method is built from: the one place they live.

    ``base`` is the update rule ("sgd" or "adamw"); ``max_grad_norm`` clips the direction each
    method steps along (``None``: no clip); ``epochs`` is the budget.  ``power_ratio`` is
    MUNBa's bargaining power w_f/w_r, normalised to w_f + w_r = 2 so that the unclipped step
    length (‖d‖² = w_f + w_r) stays that of equal power; it has no counterpart in a sum.
    The default is the published recipe (``MUNBaOptimizer.paper_faithful``).
    """

    base: str = "sgd"
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    max_grad_norm: float | None = 1.0
    epochs: int = 2
    power_ratio: float = 1.0

    def __post_init__(self):
        if self.base not in ("sgd", "adamw"):
            raise ValueError(f"Recipe.base must be 'sgd' or 'adamw', got {self.base!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"Recipe.max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.epochs < 1:
            raise ValueError(f"Recipe.epochs must be at least 1, got {self.epochs!r}")
        validate_power((self.power_ratio, 1.0))

    @property
    def bargaining_power(self) -> tuple[float, float]:
        r = self.power_ratio
        return (2 * r / (1 + r), 2 / (1 + r))

    def optimizer(self, method: str, params, lr: float, players: tuple[str, ...] | None = None) -> torch.optim.Optimizer:
        """MUNBa's optimizer clips ‖d‖ itself; the others get the same clip from :func:`clip_grads_`.

        ``players`` (MUNBa only; default forget and preserve): every player but the last is a
        forget player with power w_f, the last the preserve player with w_r."""
        if method.startswith("MUNBa"):
            extra = {"momentum": self.momentum} if self.base == "sgd" else {}
            w_f, w_r = self.bargaining_power
            players = players or ("forget", "preserve")
            return MUNBaOptimizer(
                params,
                lr,
                base=self.base,
                weight_decay=self.weight_decay,
                max_grad_norm=self.max_grad_norm,
                bargaining_power=(w_f,) * (len(players) - 1) + (w_r,),
                players=players,
                **extra,
            )
        if players is not None:
            raise ValueError(f"players= is for the MUNBa methods, not {method!r}")
        if self.base == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)


PAPER = Recipe()


def optimizer_settings(opt: torch.optim.Optimizer, max_grad_norm: float | None) -> dict:
    """What an optimizer was actually built with, read back from it (for results.json)."""
    group = opt.param_groups[0]
    munba = isinstance(opt, MUNBaOptimizer)
    base = group["base"] if munba else type(opt).__name__.lower()
    out = {
        "optimizer": f"MUNBaOptimizer(base={base})" if munba else type(opt).__name__,
        "base": base,
        "lr": float(group["lr"]),
        "weight_decay": group["weight_decay"],
        "max_grad_norm": opt.max_grad_norm if munba else max_grad_norm,
    }
    if base == "sgd":
        out["momentum"] = group["momentum"]
    else:
        out["betas"] = list(group["betas"])
    if munba:
        out["bargaining_power"] = list(opt.bargaining_power)
        out["players"] = list(opt.players)
    return out


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
    #: optimizer settings read back from the optimizer, plus epochs, steps, forget loss, β
    settings: dict = field(default_factory=dict)
    #: (norm of the direction before the clip, norm handed to the base rule) per step
    step_norms: list[tuple[float, float]] = field(default_factory=list)
    #: fingerprint of the batch plan (indices of every retain and forget batch, in order)
    plan_digest: str = ""
    #: the run as it stood after each requested epoch (``unlearn(snapshots=...)``), by epoch
    snapshots: dict[int, UnlearningRun] = field(default_factory=dict)


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


def clip_grads_(params, max_norm: float | None) -> Tensor:
    """Scale the gradients of ``params`` to total norm ≤ ``max_norm`` (exactly, as MUNBa's
    clip: no ``+1e-6``); returns the norm before clipping.  FSDP2's sharded gradients are
    scaled shard by shard with the global norm; nothing reads a value on the host."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm is not None:
        scale = (max_norm / norm).clamp(max=1.0)  # a zero gradient gives inf → 1
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        torch._foreach_mul_(local, scale.to(local[0].device))
    return norm


def unlearn(
    method: str,
    model: nn.Module,
    forget: Subset,
    retain: Subset,
    *,
    num_classes: int,
    lr: float,
    batch_size: int,
    seed: int,
    recipe: Recipe = PAPER,
    beta: float = NEGGRAD_BETA,
    snapshots: tuple[int, ...] = (),
    progress: bool = True,
    ranks: parallel.Ranks = parallel.SINGLE_PROCESS,
    forget_groups: tuple[int, ...] = (),
) -> UnlearningRun:
    """Run ``method`` in place on ``model`` (a copy of the original); returns it with timing.

    ``recipe`` builds the optimizer and sets the budget; ``beta`` is NegGrad+'s retain weight.
    ``snapshots`` (epochs below ``recipe.epochs``) also returns the run as it stood after
    those epochs: with a constant learning rate, the batches of the first k epochs and the
    random labels of their steps (a generator of their own) do not depend on the budget, so
    a snapshot at epoch k is exactly a k-epoch run (tested), at a fraction of the cost.
    Under torchrun (``ranks``), every rank draws the same batches and trains on its slice
    of each; the trained weights are complete on every rank afterwards.
    ``forget_groups`` (MUNBa methods, single process): one forget player per listed class, the
    loss on the samples of the step's forget batch whose true label is that class, all from
    one forward of the whole batch (BatchNorm normalises the merged run's batch, not
    single-class slices of it); a class absent from a batch has a zero gradient that step
    and drops out of the bargain.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0 < beta < 1:
        raise ValueError(f"NegGrad+ beta must lie in (0, 1), got {beta!r}")
    if any(not 1 <= e < recipe.epochs for e in snapshots) or (snapshots and ranks.world > 1):
        raise ValueError(f"snapshots must be epochs in 1..{recipe.epochs - 1} of a single-process run, got {snapshots}")
    groups = tuple(int(c) for c in forget_groups)
    if groups and (not method.startswith("MUNBa") or len(groups) < 2 or len(set(groups)) != len(groups)):
        raise ValueError(
            f"forget_groups are two or more distinct classes for a MUNBa method, got {forget_groups!r} for {method!r}"
        )
    if groups and ranks.world > 1:  # a class absent from one rank's slice would skip a backward there
        raise ValueError("forget_groups (one player per class) runs in a single process")
    if groups and not bool(torch.isin(forget.y, torch.tensor(groups, device=forget.y.device)).all()):
        raise ValueError(f"every forget sample must belong to one of forget_groups {groups}")
    gen = torch.Generator().manual_seed(seed)
    label_gen = torch.Generator().manual_seed(seed + 1)  # random labels: independent of the budget
    device, world, epochs = retain.x.device, ranks.world, recipe.epochs
    plain, model = model, parallel.wrap(model, ranks)
    players = (*(f"forget_{c}" for c in groups), "preserve") if groups else None
    opt = recipe.optimizer(method, model.parameters(), lr, players)
    clip = recipe.max_grad_norm
    log: list[Tensor] = []
    norms: list[Tensor] = []
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

    per_epoch = len(plan) // epochs  # every epoch has the same number of steps
    kept: dict[int, tuple[nn.Module, float]] = {}
    model.train()
    start = time.perf_counter()
    for step, (r_idx, f_idx) in enumerate(
        tqdm(plan, desc=f"{method} lr={lr:g}", unit="step", disable=not progress, leave=False)
    ):
        if step and step % per_epoch == 0 and step // per_epoch in snapshots:
            kept[step // per_epoch] = (copy.deepcopy(plain).eval(), time.perf_counter() - start)
            model.train()
        if method == "RL":
            is_forget = r_idx < len(forget)
            labels = torch.where(
                is_forget, random_labels(union.y[r_idx], num_classes, label_gen), union.y[r_idx]
            )
            fb, rb = None, ranks.local(Subset(union.x[r_idx], labels))
        else:
            fb = None if f_idx is None else Subset(forget.x[f_idx], forget.y[f_idx])
            rb = None if r_idx is None else Subset(retain.x[r_idx], retain.y[r_idx])
            true_labels = None if fb is None else fb.y
            if fb is not None and FORGET_LOSS[method] == "random_labels":
                fb = Subset(fb.x, random_labels(fb.y, num_classes, label_gen))
            fb, rb = ranks.local(fb), ranks.local(rb)
        opt.zero_grad(set_to_none=True)
        if method.startswith("MUNBa"):
            sign = 1.0 if method == "MUNBa" else -1.0
            if groups:  # one player per class: the merged batch's logits split by true label
                logits = model(fb.x)  # one forward, so BatchNorm sees the merged run's batch
                for i, (c, name) in enumerate(zip(groups, opt.players[:-1])):
                    own = true_labels == c
                    if bool(own.any()):
                        loss = sign * F.cross_entropy(logits[own], fb.y[own])
                        loss.backward(retain_graph=i < len(groups) - 1)
                    opt.capture(name)
            else:
                (sign * _ce(model, fb)).backward()
                opt.capture_forget()
            _ce(model, rb).backward()
            opt.step()
            b = opt.last_bargain
            log.append(torch.cat([b.alpha, b.cos[None]]).float())
            norms.append(torch.stack([b.direction_norm, b.direction_norm * b.clip_scale]).float())
        else:
            step_fn(model, fb, rb, beta).backward()
            raw = clip_grads_(model.parameters(), clip)
            norms.append(torch.stack([raw, raw if clip is None else raw.clamp(max=clip)]).float())
            opt.step()
    seconds = time.perf_counter() - start
    bargain_log = [tuple(row) for row in torch.stack(log).tolist()] if log else []
    step_norms = [tuple(row) for row in torch.stack([n.cpu() for n in norms]).tolist()] if norms else []
    settings = {**optimizer_settings(opt, clip), "forget_loss": FORGET_LOSS[method]}
    if method == "NegGrad+":
        settings["beta"] = beta

    def upto(epoch: int, trained: nn.Module, secs: float) -> UnlearningRun:
        k = epoch * per_epoch
        return UnlearningRun(
            trained,
            secs,
            bargain_log[:k],
            {**settings, "epochs": epoch, "steps": k},
            step_norms[:k],
            _digest(plan[:k]),
        )

    run = upto(epochs, parallel.unwrap(model, plain, ranks).eval(), seconds)
    run.snapshots = {e: upto(e, m, secs) for e, (m, secs) in sorted(kept.items())}
    return run


def _digest(plan) -> str:
    h = hashlib.sha1()
    for pair in plan:
        for idx in pair:
            h.update(b"-" if idx is None else idx.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


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


# The loss each non-bargaining method back-propagates in one backward pass.
_STEPS: dict[str, Callable] = {
    "FT": lambda m, fb, rb, beta: _ce(m, rb),
    "GA": lambda m, fb, rb, beta: -_ce(m, fb),
    "RL": lambda m, fb, rb, beta: _ce(m, rb),
    "NegGrad+": lambda m, fb, rb, beta: beta * _ce(m, rb) - (1 - beta) * _ce(m, fb),
    "Naive": lambda m, fb, rb, beta: _ce(m, fb) + _ce(m, rb),
    "MUNBa": None,  # two backward passes, bargained in the optimizer
    "MUNBa-GA": None,
}


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    model.eval()
    if len(x) == 0:
        return torch.empty(0, 0)
    return torch.cat([model(chunk).float().cpu() for chunk in x.split(batch_size)])
