"""Representation-level checks: did the *features* forget, or only the classifier head?

Logit metrics can be fooled by a model that only re-routes its last layer; the forgotten
data then stays decodable from the penultimate features.  We measure that with a k-NN
probe (fit on labelled held-out features, scored on the forget set) and compare whole
representations with linear CKA (Kornblith et al., 2019) against the retrained model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def penultimate_features(model: nn.Module, head: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Inputs of ``head`` (typically the final ``nn.Linear``) for every row of ``x``."""
    captured: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1).cpu()))
    try:
        for chunk in x.split(batch_size):
            model(chunk)
    finally:
        handle.remove()
    return torch.cat(captured) if captured else torch.empty(0)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between feature matrices ``x`` [n, p] and ``y`` [n, q] (same n rows), in [0, 1]."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).square().sum()
    norm = (x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()
    return (cross / norm).item() if norm > 0 else 0.0


def knn_probe_accuracy(
    train_x: Tensor, train_y: Tensor, eval_x: Tensor, eval_y: Tensor, k: int = 5, batch_size: int = 1024
) -> float:
    """Accuracy (percent) of a cosine k-NN classifier fit on (train_x, train_y), scored on eval.

    Ties in the vote go to the smallest label, so the result is deterministic.
    """
    if len(train_x) == 0 or len(eval_x) == 0:
        raise ValueError("knn_probe_accuracy needs non-empty train and eval sets")
    k = min(k, len(train_x))
    bank = nn.functional.normalize(train_x.double(), dim=1)
    num_classes = int(max(train_y.max(), eval_y.max())) + 1
    correct = 0
    for xb, yb in zip(eval_x.split(batch_size), eval_y.split(batch_size)):
        sims = nn.functional.normalize(xb.double(), dim=1) @ bank.T
        idx = sims.topk(k, dim=1).indices
        votes = torch.zeros(len(xb), num_classes, dtype=torch.int64)
        votes.scatter_add_(1, train_y[idx].long(), torch.ones_like(idx))
        correct += (votes.argmax(dim=1) == yb).sum().item()
    return 100.0 * correct / len(eval_x)
