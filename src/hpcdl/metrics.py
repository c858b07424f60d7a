"""A split's report, shared by train (the validation split), evaluate and finetune (the test split): scalar
metrics, per-class precision/recall/F1 and the confusion matrix (its PNGs: hpcdl.plots).

Computed here from the confusion matrix with numpy, not with scikit-learn's metrics module: importing
sklearn.metrics costs ~0.7 s on top of torch and MLflow, and rank 0 paid it in train, finetune and evaluate, one
after another on the default pipeline's critical path (issue 12, P4), for a bincount and three divisions.
tests/test_metrics.py checks every number against scikit-learn's precision_recall_fscore_support
(zero_division=0) and confusion_matrix."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def confusion_matrix(labels, predicted, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class): rows are the true class, as scikit-learn's confusion_matrix with
    labels=range(num_classes). A label or prediction outside 0..num_classes-1 is an error, not a dropped sample."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    if labels.shape != predicted.shape:
        raise ValueError(f"{labels.size} labels but {predicted.size} predictions")
    for name, values in (("label", labels), ("prediction", predicted)):
        outside = values[(values < 0) | (values >= num_classes)]
        if outside.size:
            raise ValueError(f"{name} {outside[0]} is not a class index: {num_classes} classes, 0..{num_classes - 1}")
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(len(numerator))
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def classification_report(logits: torch.Tensor, labels: np.ndarray, classes: list[str]) -> dict:
    labels = np.asarray(labels)
    predicted = logits.argmax(1).numpy()
    matrix = confusion_matrix(labels, predicted, len(classes))
    true_positives, support, predicted_count = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
    precision = _divide(true_positives, predicted_count)
    recall = _divide(true_positives, support)
    f1 = _divide(2 * true_positives, support + predicted_count)  # = 2PR / (P + R), 0 where a class is nowhere
    return {
        "accuracy": float((predicted == labels).mean()),
        "loss": float(F.cross_entropy(logits, torch.as_tensor(labels)).item()),
        "n": int(len(labels)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "macro_f1": float(f1.mean()),
        "confusion_matrix": matrix.tolist(),
    }
