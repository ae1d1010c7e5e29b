"""Hard forget sets and the relearning attack, against small hand-computed references."""

import copy

import pytest
import torch
import torch.nn.functional as F

from munba_kernels.drivers import robustness
from munba_kernels.drivers.unlearning import Subset


def test_true_class_margin_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 5.0], [0.5, 2.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 0])
    # true logit minus the best other: 2-1, 1-3, 5-1, 0.5-2
    assert robustness.true_class_margin(logits, labels).tolist() == [1.0, -2.0, 4.0, -1.5]


def test_hard_forget_mask_takes_the_best_fitted_samples_ties_by_index():
    labels = torch.zeros(6, dtype=torch.long)
    other = torch.tensor([0.0, 3.0, 1.0, 3.0, -2.0, 0.0])  # margins: 0, -3, -1, -3, 2, 0 (logit of class 0 is 0)
    logits = torch.stack([torch.zeros(6), other], dim=1)
    mask = robustness.hard_forget_mask(logits, labels, 0.5)  # round(3): samples 4 (2), then 0 and 5 (0, tie)
    assert mask.tolist() == [True, False, False, False, True, True]
    assert robustness.hard_forget_mask(logits, labels, 0.2).tolist() == [False] * 4 + [True, False]
    with pytest.raises(ValueError, match="forget_ratio"):
        robustness.hard_forget_mask(logits, labels, 1.0)


def test_relearn_split_is_a_seeded_disjoint_cover():
    s, r = robustness.relearn_split(40, 0.1, seed=3)
    assert len(s) == 4 and len(r) == 36
    assert sorted(torch.cat([s, r]).tolist()) == list(range(40))
    assert torch.equal(s, robustness.relearn_split(40, 0.1, seed=3)[0])
    assert len(robustness.relearn_split(10, 0.05, seed=0)[0]) == 2  # at least two samples


def _toy_forget(n=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    y = (x[:, 0] > 0).long()  # linearly separable by the first coordinate
    return Subset(x, y)


def test_relearn_curve_one_step_matches_a_float64_hand_step():
    """One full-slice SGD step: W1 = W0 − lr ∇CE(slice); the curve's second point is the
    accuracy of W1 on the forget samples outside the slice."""
    forget = _toy_forget()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2, bias=False)
    attack = robustness.RelearnAttack(fractions=(0.2,), steps=1, lr=0.7, batch_size=64, eval_every=1)
    curve = robustness.relearn_curve(model, forget, 0.2, attack, seed=5)
    slice_idx, rest_idx = robustness.relearn_split(len(forget), 0.2, seed=5)
    w0 = model.weight.detach().double().clone().requires_grad_(True)
    F.cross_entropy(forget.x[slice_idx].double() @ w0.T, forget.y[slice_idx]).backward()
    w1 = w0.detach() - 0.7 * w0.grad

    def acc(w):
        return 100.0 * ((forget.x[rest_idx].double() @ w.T).argmax(1) == forget.y[rest_idx]).double().mean().item()

    assert curve["steps"] == [0, 1] and curve["slice"] == 6 and curve["rest"] == 24
    assert curve["forget_acc"] == pytest.approx([acc(w0.detach()), acc(w1)])
    assert torch.equal(model.weight.detach().double(), w0.detach())  # the attacked model is a copy


def test_relearn_curve_recovers_a_forgotten_rule_and_zero_lr_changes_nothing():
    forget = _toy_forget(200)
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():  # "unlearned": predicts the opposite of the rule
        model.weight.copy_(torch.tensor([[3.0, 0, 0, 0], [-3.0, 0, 0, 0]]))
        model.bias.zero_()
    attack = robustness.RelearnAttack(fractions=(0.1,), steps=30, lr=0.5, eval_every=10)
    curve = robustness.relearn_curve(model, forget, 0.1, attack, seed=0)
    assert curve["steps"] == [0, 10, 20, 30]
    assert curve["forget_acc"][0] == 0.0 and curve["forget_acc"][-1] > 80.0  # chance: 50
    assert len(curve["slice_loss"]) == 4 and curve["slice_loss"][-1] < 0.5 * curve["slice_loss"][0]
    frozen = robustness.relearn_curve(model, forget, 0.1, robustness.RelearnAttack(lr=1e-12, steps=20), seed=0)
    assert frozen["forget_acc"] == [0.0] * 3


def test_relearn_keeps_batchnorm_statistics_frozen():
    forget = _toy_forget(40)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    before = copy.deepcopy(model[1].running_mean)
    robustness.relearn_curve(model, forget, 0.25, robustness.RelearnAttack(steps=5, eval_every=5), seed=0)
    assert torch.equal(model[1].running_mean, before)
    with pytest.raises(ValueError, match="fractions"):
        robustness.RelearnAttack(fractions=(0.0,))
