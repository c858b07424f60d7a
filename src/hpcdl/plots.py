"""The stages' PNGs (rule outputs shown in `snakemake --report`, and MLflow artifacts): the training curves of
train and finetune (loss and accuracy per epoch from a stage's history, and for fine-tuning the scratch baseline on
the same axes with both test accuracies, so "does pretraining help?" is answered by one picture), and the test
split's confusion matrix and misclassified images (evaluate, finetune).

Drawn on rank 0 at the end of a stage. matplotlib is imported only here, when a plot is drawn, and through
matplotlib.figure.Figure rather than pyplot: no backend or display is chosen or needed (headless compute nodes),
and no global figure state is left behind. Files are written atomically (hpcdl.atomic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcdl.atomic import atomic_output

# One colour per model, one line style per split: the same reading in every curves plot.
MODEL_COLOURS = {None: "C0", "fine-tuned": "C0", "baseline": "C1"}
SPLIT_STYLES = {"train": "-", "validation": "--"}
# (panel title, history key of the training split, history key of the validation split)
PANELS = (("loss", "loss", "val_loss"), ("accuracy", "accuracy", "val_accuracy"))


def _new_figure(width: float, height: float):
    """Every PNG's figure: inches at 100 dpi, laid out by matplotlib's constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _figure(panels: int):
    fig = _new_figure(4.2 * panels, 3.6)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _draw_history(axes, history: list[dict], model: str | None = None) -> None:
    """Train (solid) and validation (dashed) curves of one model (named in the legend when there are two),
    epochs numbered from 1."""
    epochs = list(range(1, len(history) + 1))
    for ax, (_, train_key, val_key) in zip(axes, PANELS):
        for split, key in (("train", train_key), ("validation", val_key)):
            label = f"{model} {split}" if model else split
            ax.plot(epochs, [entry[key] for entry in history], SPLIT_STYLES[split], color=MODEL_COLOURS[model], marker=".", label=label)


def _label_panels(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax, (name, _, _) in zip(axes, PANELS):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def _save(fig, path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")  # the temporary name has no .png suffix to infer it from


def plot_training_curves(history: list[dict], path, *, title: str) -> Path:
    """Loss and accuracy per epoch, training and validation split, of one training run."""
    fig, axes = _figure(2)
    _draw_history(axes, history)
    _label_panels(axes)
    fig.suptitle(title)
    _save(fig, path)
    return Path(path)


def plot_finetune_curves(history: list[dict], epochs_frozen: int, baseline_history: list[dict] | None, accuracies: dict, path, *, title: str) -> Path:
    """The fine-tuned model's frozen then unfrozen epochs (boundary marked) and, on the same axes, the scratch
    baseline's; a third panel compares the test accuracies ({"fine-tuned": a, "baseline": b}; baseline optional)."""
    fig, axes = _figure(3)
    curves = axes[:2]
    _draw_history(curves, history, "fine-tuned")
    if baseline_history:
        _draw_history(curves, baseline_history, "baseline")
    if 0 < epochs_frozen < len(history):
        for ax in curves:
            ax.axvline(epochs_frozen + 0.5, color="grey", linestyle=":", linewidth=1)
            ax.text(epochs_frozen + 0.5, 1.01, " frozen | unfrozen ", transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7, color="grey")
    _label_panels(curves)
    bars = axes[2]
    names = [name for name in ("fine-tuned", "baseline") if accuracies.get(name) is not None]
    values = [100 * accuracies[name] for name in names]
    drawn = bars.bar(names, values, color=[MODEL_COLOURS[name] for name in names])
    bars.bar_label(drawn, labels=[f"{v:.2f}%" for v in values])
    bars.set_ylim(0, 110)
    bars.set_ylabel("test accuracy (%)")
    bars.set_title("test split")
    fig.suptitle(title)
    _save(fig, path)
    return Path(path)


def plot_confusion(matrix, classes: list[str], path, *, title: str) -> Path:
    """The confusion matrix (rows: true class) as a heat map with each cell's count, drawn as scikit-learn's
    ConfusionMatrixDisplay draws it: light text on dark cells, dark text on light ones."""
    matrix = np.asarray(matrix)
    side = 1 + 0.6 * len(classes)
    fig = _new_figure(side, side)
    ax = fig.subplots()
    image = ax.imshow(matrix, interpolation="nearest", cmap="Blues")
    dark_text, light_text = image.cmap(1.0), image.cmap(0.0)
    middle = (matrix.max() + matrix.min()) / 2
    for (row, column), count in np.ndenumerate(matrix):
        ax.text(column, row, f"{count}", ha="center", va="center", color=dark_text if count < middle else light_text)
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes, xlabel="Predicted label", ylabel="True label", title=title)
    _save(fig, path)
    return Path(path)


def plot_misclassified(images, labels, predicted, classes: list[str], path, limit: int = 36) -> Path:
    """A grid of up to `limit` wrong test predictions, titled 'true -> predicted' (an empty note if none)."""
    wrong = np.flatnonzero(np.asarray(labels) != np.asarray(predicted))[:limit]
    columns = 6
    rows = max(1, -(-len(wrong) // columns))
    fig = _new_figure(1.6 * columns, 1.8 * rows)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, wrong):
        image = images[index]
        grey = image.shape[0] == 1
        ax.imshow(image[0] if grey else image.transpose(1, 2, 0), cmap="gray" if grey else None)
        ax.set_title(f"{classes[labels[index]]} -> {classes[predicted[index]]}", fontsize=8)
    if len(wrong) == 0:
        axes.flat[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.suptitle(f"misclassified test images ({len(wrong)} shown)")
    _save(fig, path)
    return Path(path)
