"""Rule sweep_summary: one table and three plots of a sweep (config `sweep.grid`), so the trade-off between
throughput and convergence reads at a glance, with the sweet spot marked.

Per point, from the metrics.json its training (rule train_sweep) wrote: samples/s (the mean over its epochs of
the samples all ranks trained per second), seconds to target (the summed `epoch_seconds`, training plus validation,
of the epochs up to the first whose validation accuracy reaches `sweep.target_val_accuracy`; empty if none
did), the final validation accuracy, epochs and world size.

The sweet spot is the point that reaches the target in the fewest seconds; ties, and a sweep where no point
reaches the target, are decided by the higher final validation accuracy (then by samples/s)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import mlflow

from hpcdl import tracking
from hpcdl.atomic import atomic_output, atomic_write_text
from hpcdl.cli import stage_parser
from hpcdl.stage_clock import StageClock
from hpcdl.sweep_grid import SWEEP_KEYS, show_value

# (file name, CSV column, y-axis label) of the three plots
PLOTS = (
    ("throughput.png", "samples_per_second", "samples/s (all ranks, mean over epochs)"),
    ("time_to_target.png", "seconds_to_target", "seconds to target val accuracy"),
    ("final_accuracy.png", "final_val_accuracy", "final val accuracy"),
)
RESULT_COLUMNS = ["samples_per_second", "seconds_to_target", "epochs_to_target", "final_val_accuracy", "epochs", "world_size", "sweet_spot", "mlflow_run_id"]


def point_row(name: str, values: dict, metrics: dict, target: float) -> dict:
    """One point's row of the table from its training's metrics.json."""
    history = metrics["history"]
    seconds, reached = 0.0, None
    for epoch, record in enumerate(history, start=1):
        seconds += record["epoch_seconds"]
        if record["val_accuracy"] >= target:
            reached = epoch
            break
    return {
        "point": name,
        **values,
        "samples_per_second": round(sum(r["samples_per_second"] for r in history) / len(history), 1),
        "seconds_to_target": round(seconds, 3) if reached else None,
        "epochs_to_target": reached,
        "final_val_accuracy": round(metrics["val"]["accuracy"], 6),
        "epochs": metrics["epochs"],
        "world_size": metrics.get("world_size"),
        "sweet_spot": False,
        "mlflow_run_id": metrics["mlflow"]["run_id"],
    }


def sweet_spot(rows: list[dict]) -> dict:
    """The fastest point to the target; ties and never-reached decided by final val accuracy, then samples/s."""

    def rank(row):
        reached = row["seconds_to_target"] is not None
        return (not reached, row["seconds_to_target"] if reached else 0.0, -row["final_val_accuracy"], -row["samples_per_second"])

    return min(rows, key=rank)


def csv_text(rows: list[dict], keys: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["point", *keys, *RESULT_COLUMNS], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else str(v).lower() if isinstance(v, bool) else v) for k, v in row.items()})
    return out.getvalue()


def _axis_layout(rows: list[dict], keys: list[str]) -> tuple[str, list, list[str]]:
    """The swept key on the x axis (the first one with several values), its values in grid order, and the other
    varying keys (one line per combination of their values)."""
    varying = [k for k in keys if len({show_value(r[k]) for r in rows}) > 1] or keys[:1]
    x_key = varying[0]
    x_values = list(dict.fromkeys(r[x_key] for r in rows))
    return x_key, x_values, varying[1:]


def plot(rows: list[dict], keys: list[str], best: dict, column: str, ylabel: str, path: Path, target: float) -> None:
    """`column` against the x-axis key's values (evenly spaced, in grid order), one line per combination of the
    other swept keys, the sweet spot a gold star. Points that never reached the target (time-to-target plot) are
    red crosses on the top edge."""
    from matplotlib.figure import Figure  # no pyplot: no backend or display needed on compute nodes

    x_key, x_values, series_keys = _axis_layout(rows, keys)
    position = {show_value(v): i for i, v in enumerate(x_values)}
    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    series = list(dict.fromkeys(tuple(show_value(r[k]) for k in series_keys) for r in rows))
    missing = []
    for index, combination in enumerate(series):
        members = [r for r in rows if tuple(show_value(r[k]) for k in series_keys) == combination]
        members.sort(key=lambda r: position[show_value(r[x_key])])
        drawn = [(position[show_value(r[x_key])], r[column]) for r in members if r[column] is not None]
        missing += [position[show_value(r[x_key])] for r in members if r[column] is None]
        label = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in zip(series_keys, combination)) or None
        if drawn:
            ax.plot(*zip(*drawn), marker="o", color=f"C{index % 10}", label=label)
    top = max([r[column] for r in rows if r[column] is not None] or [1.0])
    if missing:
        ax.plot(missing, [top * 1.05] * len(missing), "x", color="red", markersize=10, linestyle="none", label=f"never reached {target:g}")
    if best[column] is not None:
        ax.plot([position[show_value(best[x_key])]], [best[column]], marker="*", markersize=20, color="gold",
                markeredgecolor="black", linestyle="none", label=f"sweet spot: {best['point']}", zorder=5)
    else:
        ax.text(0.5, 0.5, f"no point reached val accuracy {target:g}\nsweet spot (best accuracy): {best['point']}",
                transform=ax.transAxes, ha="center", va="center")
    ax.set_xticks(range(len(x_values)), [show_value(v) for v in x_values])
    ax.set_xlim(-0.5, len(x_values) - 0.5)
    ax.set_xlabel(x_key)
    ax.set_ylabel(ylabel)
    ax.set_title(f"sweep over {', '.join(keys)}: {ylabel}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")


def main(argv=None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    clock = StageClock()
    sweep = args.params["sweep"]
    target = sweep["target_val_accuracy"]
    keys = [key for key in SWEEP_KEYS if key in sweep["grid"]]
    rows = [point_row(p["name"], p["values"], json.loads(Path(p["metrics"]).read_text()), target) for p in sweep["points"]]
    if not rows:
        raise SystemExit("hpcdl.sweep_summary: sweep.grid is empty: no point to summarise")
    best = sweet_spot(rows)
    best["sweet_spot"] = True
    clock.mark("data")
    tags = tracking.runtime_tags("sweep_summary", image_record=args.params.get("image_record"), world_size=1)
    tags.update({"hpcdl.sweep.best_point": best["point"], **{f"hpcdl.sweep.best.{k}": show_value(best[k]) for k in keys}})
    with tracking.stage_run(args.params["mlflow"], stage="sweep_summary", parent_run_file=args.parent_run, tags=tags) as run:
        tracking.print_where(args.params["mlflow"], run)
        clock.mark("mlflow_setup")
        mlflow.log_params({"sweep.target_val_accuracy": target, "sweep.points": len(rows),
                           **tracking.flatten({f"sweep.grid.{k}": sweep["grid"][k] for k in keys}),
                           **{f"sweep.best.{k}": best[k] for k in keys}, "sweep.best_point": best["point"]})
        mlflow.log_metrics({f"best.{c}": best[c] for c in ("samples_per_second", "seconds_to_target", "final_val_accuracy") if best[c] is not None})
        for name, column, ylabel in PLOTS:
            plot(rows, keys, best, column, ylabel, args.out_dir / name, target)
            mlflow.log_artifact(str(args.out_dir / name), artifact_path="sweep")
        table = csv_text(rows, keys)
        mlflow.log_text(table, "sweep/summary.csv")
        clock.mark("summary")
        mlflow.log_metrics(clock.metrics())
        atomic_write_text(args.out_dir / "summary.csv", table)
    reached = f"{best['seconds_to_target']} s to val accuracy {target:g}" if best["seconds_to_target"] is not None else f"no point reached val accuracy {target:g}"
    print(f"hpcdl: sweep of {len(rows)} points; sweet spot {best['point']}: {reached}, "
          f"final val accuracy {100 * best['final_val_accuracy']:.2f}%, {best['samples_per_second']:,.0f} samples/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
