"""Unlearning metrics on hand-computable cases."""

import math

import pytest
import torch

from munba_kernels.evaluation import (
    accuracy,
    avg_gap,
    knn_probe_accuracy,
    linear_cka,
    mia_efficacy,
    penultimate_features,
    true_class_confidence,
)
from munba_kernels.evaluation.metrics import unlearning_metrics


def test_accuracy_and_confidence():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    assert accuracy(logits, labels) == 75.0  # last row ties: argmax picks class 0
    conf = true_class_confidence(logits, labels)
    assert conf[0].item() == pytest.approx(1 / (1 + math.exp(-2)))
    assert conf[2].item() == pytest.approx(1 / (1 + math.exp(3)))
    assert conf[3].item() == pytest.approx(0.5)
    assert accuracy(torch.empty(0, 2), torch.empty(0, dtype=torch.long)) == 0.0


def test_mia_separable_confidences_give_exact_shares():
    retain = torch.full((50,), 0.99)  # members: confident
    test = torch.full((40,), 0.30)  # non-members: unsure
    # 3 forget samples look like members, 7 like non-members
    forget = torch.tensor([0.99] * 3 + [0.30] * 7)
    assert mia_efficacy(retain, test, forget) == pytest.approx(70.0)
    assert mia_efficacy(retain, test, torch.full((5,), 0.98)) == 0.0
    assert mia_efficacy(retain, test, torch.full((5,), 0.31)) == 100.0


def test_mia_uses_only_the_first_test_sized_retain_samples():
    # The retain tail (beyond |test|) is poisoned to look like non-members; it must be ignored.
    retain = torch.cat([torch.full((20,), 0.95), torch.full((500,), 0.2)])
    test = torch.full((20,), 0.2)
    assert mia_efficacy(retain, test, torch.full((4,), 0.95)) == 0.0


def test_mia_rejects_empty_sets():
    with pytest.raises(ValueError, match="forget"):
        mia_efficacy(torch.ones(3), torch.zeros(3), torch.empty(0))
    with pytest.raises(ValueError, match="retain and test"):
        mia_efficacy(torch.ones(3), torch.empty(0), torch.ones(2))


def test_avg_gap():
    retrain = {"UA": 10.0, "RA": 100.0, "TA": 90.0, "MIA": 20.0}
    method = {"UA": 12.0, "RA": 99.0, "TA": 91.0, "MIA": 16.0, "seconds": 3.0}
    assert avg_gap(method, retrain) == pytest.approx((2 + 1 + 1 + 4) / 4)
    assert avg_gap(retrain, retrain) == 0.0
    with pytest.raises(KeyError, match="MIA"):
        avg_gap({"UA": 1, "RA": 1, "TA": 1}, retrain)


def test_unlearning_metrics_combines_the_four():
    eye = torch.eye(3) * 5
    forget = (eye[[0, 0]], torch.tensor([0, 1]))  # one of two right → UA 50
    retain = (eye.repeat(4, 1), torch.tensor([0, 1, 2] * 4))
    test = (eye, torch.tensor([0, 1, 0]))
    m = unlearning_metrics(forget, retain, test)
    assert m["UA"] == 50.0 and m["RA"] == 100.0 and m["TA"] == pytest.approx(200 / 3)
    assert 0.0 <= m["MIA"] <= 100.0


def test_linear_cka_properties():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0)  # rotation, scale, shift
    assert linear_cka(x, torch.randn(200, 10, generator=gen)) < 0.2
    with pytest.raises(ValueError, match="rows"):
        linear_cka(x, x[:10])


def test_knn_probe_accuracy():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    train_y = torch.tensor([0, 0, 1, 1])
    eval_x = torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 0.0]])
    assert knn_probe_accuracy(train_x, train_y, eval_x, torch.tensor([0, 1, 1]), k=1) == pytest.approx(
        200 / 3
    )
    assert knn_probe_accuracy(train_x, train_y, eval_x, torch.tensor([0, 1, 0]), k=3) == 100.0


def test_penultimate_features_reads_the_head_input():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(10, 3)
    feats = penultimate_features(model, model[2], x, batch_size=3)
    torch.testing.assert_close(feats, model[1](model[0](x)).detach())
    assert not model[2]._forward_pre_hooks  # hook removed
