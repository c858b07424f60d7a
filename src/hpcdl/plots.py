"""Training-curve PNGs of the train and finetune stages (rule outputs shown in `snakemake --report`, and MLflow
artifacts): loss and accuracy per epoch from a stage's history, and for fine-tuning the scratch baseline on the
same axes with both test accuracies, so "does pretraining help?" is answered by one picture.

Drawn on rank 0 at the end of a stage. matplotlib is imported only here, when a plot is drawn, and through
matplotlib.figure.Figure rather than pyplot: no backend or display is chosen or needed (headless compute nodes),
and no global figure state is left behind. Files are written atomically (hpcdl.atomic)."""

from __future__ import annotations

from pathlib import Path

from hpcdl.atomic import atomic_output

# One colour per model, one line style per split: the same reading in every curves plot.
MODEL_COLOURS = {None: "C0", "fine-tuned": "C0", "baseline": "C1"}
SPLIT_STYLES = {"train": "-", "validation": "--"}
# (panel title, history key of the training split, history key of the validation split)
PANELS = (("loss", "loss", "val_loss"), ("accuracy", "accuracy", "val_accuracy"))


def _figure(panels: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * panels, 3.6), dpi=100, layout="constrained")
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
