"""Test-set reporting shared by the evaluate and finetune stages: scalar metrics, per-class precision/recall/F1,
the confusion matrix, and the two PNGs (scikit-learn computes, matplotlib draws)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: compute nodes have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, precision_recall_fscore_support  # noqa: E402


def classification_report(logits: torch.Tensor, labels: np.ndarray, classes: list[str]) -> dict:
    labels_t = torch.as_tensor(labels)
    predicted = logits.argmax(1).numpy()
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(len(classes))), zero_division=0
    )
    return {
        "accuracy": float((predicted == labels).mean()),
        "loss": float(F.cross_entropy(logits, labels_t).item()),
        "n": int(len(labels)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "macro_f1": float(f1.mean()),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=list(range(len(classes)))).tolist(),
    }


def plot_confusion(matrix, classes: list[str], path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(classes), 1 + 0.6 * len(classes)), dpi=100)
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=classes).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_misclassified(images: np.ndarray, labels, predicted, classes: list[str], path, limit: int = 36) -> None:
    """A grid of up to `limit` wrong test predictions, titled 'true -> predicted' (an empty note if none)."""
    wrong = np.flatnonzero(np.asarray(labels) != np.asarray(predicted))[:limit]
    cols = 6
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, wrong):
        image = images[index]
        ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), cmap="gray" if image.shape[0] == 1 else None)
        ax.set_title(f"{classes[labels[index]]} -> {classes[predicted[index]]}", fontsize=8)
    if len(wrong) == 0:
        axes.flat[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.suptitle(f"misclassified test images ({len(wrong)} shown)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
