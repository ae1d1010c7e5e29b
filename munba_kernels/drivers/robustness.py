"""Robustness of classification unlearning: a harder forget set and a relearning attack.

* **Hard forget set** (``--scenario hard``): the ``forget_ratio`` share of training samples
  that the original model fits best, by true-class margin (true logit minus the largest
  other logit).  A cheap proxy for the worst-case forget sets of the literature, which are
  found by a bi-level search: these samples are the most typical of their class, so
  Retrain still classifies them almost perfectly, and any method that erases "the forget
  set" instead of its membership signal overshoots (UA far above Retrain's).
* **Relearning attack**: fine-tune the unlearned model on a small slice of the forget set
  (same slice, steps, learning rate and batches for every method and for Retrain) and
  track the accuracy on the *rest* of the forget set.  Retrain, which never saw the forget
  set, is the reference: recovering faster or higher than Retrain means the unlearned
  model kept what it was asked to forget.  The attack trains the weights only: BatchNorm
  statistics stay the unlearned model's (eval mode), so that a slice of one class does not
  shift them and the curve measures what the weights kept.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from munba_kernels.evaluation import accuracy

from .unlearning import Subset, predict


def true_class_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Per sample: the true class's logit minus the largest other logit (float64)."""
    logits = logits.double()
    true = logits.gather(1, labels.long()[:, None]).squeeze(1)
    others = logits.scatter(1, labels.long()[:, None], float("-inf"))
    return true - others.max(dim=1).values


def hard_forget_mask(logits: Tensor, labels: Tensor, forget_ratio: float) -> Tensor:
    """Boolean mask of the ``round(forget_ratio · n)`` samples with the largest true-class
    margin under the original model (ties: the lower index first)."""
    if not 0 < forget_ratio < 1:
        raise ValueError(f"forget_ratio must lie in (0, 1), got {forget_ratio!r}")
    n = len(labels)
    count = max(1, round(forget_ratio * n))
    order = torch.sort(true_class_margin(logits, labels), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


@dataclass(frozen=True)
class RelearnAttack:
    """The attack every model gets: plain SGD (momentum 0.9, no decay, no clip) on the
    cross-entropy of ``fraction`` of the forget set with its true labels."""

    fractions: tuple[float, ...] = (0.05, 0.1)
    steps: int = 50
    lr: float = 1e-3  # 1e-2 diverges on the narrow ResNet (loss → NaN within 20 steps), Retrain included
    batch_size: int = 32
    eval_every: int = 10

    def __post_init__(self):
        if not self.fractions or not all(0 < f < 1 for f in self.fractions):
            raise ValueError(f"relearn fractions must lie in (0, 1), got {self.fractions!r}")
        if self.steps < 1 or self.eval_every < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"relearn steps, eval_every, batch_size and lr must be positive: {self!r}")


def relearn_split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(slice, rest) indices into a forget set of ``n``: a seeded ``fraction`` of it (at least
    2 samples, at most all but one) and the remainder."""
    count = min(n - 1, max(2, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:count], order[count:]


def relearn_curve(
    model: nn.Module, forget: Subset, fraction: float, attack: RelearnAttack, seed: int
) -> dict:
    """Accuracy (%) on the forget samples outside the slice after 0, eval_every, … steps of
    fine-tuning a copy of ``model`` on the slice.  ``model`` itself is left unchanged."""
    if len(forget) < 3:
        raise ValueError(f"a relearning attack needs at least 3 forget samples, got {len(forget)}")
    slice_idx, rest_idx = relearn_split(len(forget), fraction, seed)
    dev = forget.x.device
    slice_x, slice_y = forget.x[slice_idx.to(dev)], forget.y[slice_idx.to(dev)]
    rest_x, rest_y = forget.x[rest_idx.to(dev)], forget.y[rest_idx.to(dev)].cpu()
    model = copy.deepcopy(model).eval()  # eval: BatchNorm statistics stay frozen
    opt = torch.optim.SGD(model.parameters(), lr=attack.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    batch = min(attack.batch_size, len(slice_idx))

    def rest_accuracy() -> float:
        return accuracy(predict(model, rest_x), rest_y)

    def slice_loss() -> float:  # did the attack fit its slice (and not diverge)?
        return F.cross_entropy(predict(model, slice_x), slice_y.cpu()).item()

    steps, acc, fit = [0], [rest_accuracy()], [slice_loss()]
    pending: list[Tensor] = []
    for step in range(1, attack.steps + 1):
        if not pending:  # cycle through seeded shuffles of the slice
            pending = list(torch.randperm(len(slice_idx), generator=gen).split(batch))
            if len(pending) > 1 and len(pending[-1]) < batch:
                pending.pop()  # equal batch sizes: every step weighs the same
        idx = pending.pop(0).to(dev)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(slice_x[idx]), slice_y[idx]).backward()
        opt.step()
        if step % attack.eval_every == 0 or step == attack.steps:
            steps.append(step)
            acc.append(rest_accuracy())
            fit.append(slice_loss())
    if not (math.isfinite(fit[-1]) and fit[-1] <= fit[0]):
        warnings.warn(
            f"the relearning attack did not fit its slice (loss {fit[0]:.3g} → {fit[-1]:.3g}): "
            "it diverged or the rate is too high; its forget accuracies measure that, not what was kept",
            stacklevel=2,
        )
    return {
        "fraction": fraction,
        "slice": len(slice_idx),
        "rest": len(rest_idx),
        "steps": steps,
        "forget_acc": acc,
        "slice_loss": fit,
    }


def relearn_all(model: nn.Module, forget: Subset, attack: RelearnAttack, seed: int) -> dict[str, dict]:
    """One curve per slice fraction, keyed like ``"5%"``."""
    return {f"{f:.0%}": relearn_curve(model, forget, f, attack, seed) for f in attack.fractions}
