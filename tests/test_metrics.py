"""The test-split report (hpcdl.metrics) and its PNGs (hpcdl.plots): the numbers are scikit-learn's, computed
without importing it (0.7 s of each reporting stage's critical path)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from hpcdl.metrics import classification_report
from hpcdl.plots import plot_confusion, plot_misclassified

CLASSES = [f"c{k}" for k in range(6)]


def _logits_predicting(predicted: np.ndarray) -> torch.Tensor:
    logits = torch.randn(len(predicted), len(CLASSES))
    logits[torch.arange(len(predicted)), torch.from_numpy(predicted)] = 10.0
    return logits


def test_the_report_is_scikit_learns_to_the_last_bit():
    """Random labels and predictions where class 4 is never predicted and class 5 never occurs (precision, recall
    and F1 of 0 by scikit-learn's zero_division=0, not NaN)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    predicted = np.where(rng.random(400) < 0.7, labels, rng.integers(0, 6, 400))
    predicted[predicted == 4] = 3
    report = classification_report(_logits_predicting(predicted), labels, CLASSES)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=range(6), zero_division=0)
    per_class = report["per_class"]
    np.testing.assert_array_equal([per_class[c]["precision"] for c in CLASSES], precision)
    np.testing.assert_array_equal([per_class[c]["recall"] for c in CLASSES], recall)
    np.testing.assert_array_equal([per_class[c]["f1"] for c in CLASSES], f1)
    np.testing.assert_array_equal([per_class[c]["support"] for c in CLASSES], support)
    assert report["macro_f1"] == f1.mean()
    assert report["confusion_matrix"] == confusion_matrix(labels, predicted, labels=range(6)).tolist()
    assert report["accuracy"] == (labels == predicted).mean() and report["n"] == 400
    assert per_class["c4"]["precision"] == 0 and per_class["c5"] == {"precision": 0, "recall": 0, "f1": 0, "support": 0}


def test_a_label_outside_the_classes_is_an_error_not_a_dropped_sample():
    labels = np.array([0, 1, 7, 2])
    with pytest.raises(ValueError, match=r"label 7 is not a class index: 6 classes, 0\.\.5"):
        classification_report(_logits_predicting(np.array([0, 1, 2, 2])), labels, CLASSES)


def test_the_reporting_stages_do_not_import_scikit_learn():
    """train, finetune and evaluate report on rank 0 at the end, on the pipeline's critical path."""
    program = "import sys, hpcdl.train, hpcdl.finetune, hpcdl.evaluate; print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_the_confusion_matrix_and_misclassified_grid_are_pngs(tmp_path):
    from matplotlib.image import imread

    matrix = confusion_matrix([0, 1, 2, 2], [0, 2, 2, 2], labels=range(3))
    plot_confusion(matrix, ["a", "b", "c"], tmp_path / "confusion.png", title="t")
    images = np.zeros((4, 1, 8, 8), dtype=np.uint8)
    plot_misclassified(images, np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]), ["a", "b", "c"], tmp_path / "wrong.png")
    plot_misclassified(images, np.array([0, 1]), np.array([0, 1]), ["a", "b", "c"], tmp_path / "none.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "none.png", "wrong.png"], "no temporary files left"
    for name in ("confusion.png", "wrong.png", "none.png"):
        assert imread(tmp_path / name).shape[2] == 4
