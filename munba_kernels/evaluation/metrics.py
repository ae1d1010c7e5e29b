"""The field's unlearning metrics, as percentages in [0, 100].

* UA = 100 − accuracy on the forget set; RA = retain accuracy; TA = test accuracy.
* MIA-Efficacy (SalUn / Unlearn-Sparse): an RBF SVC (C=3, gamma='auto') learns to tell
  members from non-members by the model's true-class probability, trained on the first
  |test| retain samples (label 1, members) against the test samples (label 0); efficacy is
  the share of forget samples it calls non-members.  Higher = the forget set looks unseen.
* Avg. Gap = mean over {UA, RA, TA, MIA} of |method − Retrain|; Retrain (trained from
  scratch without the forget set) is the gold standard, so lower is better.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

GAP_METRICS = ("UA", "RA", "TA", "MIA")


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent (0 for an empty set)."""
    if labels.numel() == 0:
        return 0.0
    return 100.0 * (logits.argmax(dim=1) == labels).double().mean().item()


def true_class_confidence(logits: Tensor, labels: Tensor) -> Tensor:
    """Softmax probability of the true class per sample, computed in float64."""
    return logits.double().softmax(dim=1).gather(1, labels.long()[:, None]).squeeze(1)


def mia_efficacy(retain_conf: Tensor, test_conf: Tensor, forget_conf: Tensor) -> float:
    """Share (percent) of forget samples that a confidence-based MIA classifies as non-members."""
    from sklearn.svm import SVC  # optional dependency (the "drivers" extra)

    n = len(test_conf)
    if n == 0 or len(retain_conf) == 0:
        raise ValueError("mia_efficacy needs non-empty retain and test sets")
    if len(forget_conf) == 0:
        raise ValueError("mia_efficacy needs a non-empty forget set")
    members = np.asarray(retain_conf[:n], dtype=np.float64).reshape(-1, 1)
    non_members = np.asarray(test_conf, dtype=np.float64).reshape(-1, 1)
    x = np.concatenate([members, non_members])
    y = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(x, y)
    pred = clf.predict(np.asarray(forget_conf, dtype=np.float64).reshape(-1, 1))
    return 100.0 * float((pred == 0).mean())


def avg_gap(method: Mapping[str, float], retrain: Mapping[str, float]) -> float:
    """Mean absolute difference to Retrain over UA, RA, TA and MIA."""
    missing = [k for k in GAP_METRICS if k not in method or k not in retrain]
    if missing:
        raise KeyError(f"avg_gap needs {GAP_METRICS}; missing {missing}")
    return float(np.mean([abs(method[k] - retrain[k]) for k in GAP_METRICS]))


@torch.no_grad()
def unlearning_metrics(
    forget: tuple[Tensor, Tensor], retain: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
) -> dict[str, float]:
    """UA, RA, TA and MIA from (logits, labels) of the forget, retain and test sets."""
    (lf, yf), (lr, yr), (lt, yt) = forget, retain, test
    return {
        "UA": 100.0 - accuracy(lf, yf),
        "RA": accuracy(lr, yr),
        "TA": accuracy(lt, yt),
        "MIA": mia_efficacy(
            true_class_confidence(lr, yr), true_class_confidence(lt, yt), true_class_confidence(lf, yf)
        ),
    }
