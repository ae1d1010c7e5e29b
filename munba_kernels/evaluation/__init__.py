"""Evaluation shared by the unlearning drivers: the field's metrics and representation checks.

metrics.py         UA, RA, TA, MIA-Efficacy, Avg. Gap (SalUn / Unlearn-Sparse conventions)
representation.py  linear CKA and probe accuracy on penultimate features
generation.py      judging generated images: forget recognition, per-class accuracy, KID
"""

from .generation import generation_scores, kernel_inception_distance
from .metrics import accuracy, avg_gap, mia_efficacy, true_class_confidence
from .representation import knn_probe_accuracy, linear_cka, penultimate_features

__all__ = [
    "accuracy",
    "avg_gap",
    "mia_efficacy",
    "true_class_confidence",
    "knn_probe_accuracy",
    "linear_cka",
    "penultimate_features",
    "generation_scores",
    "kernel_inception_distance",
]
