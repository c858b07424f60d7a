"""The points of a sweep (config `sweep.grid`): the cartesian product of the swept `train.*` values, each named
like `batch_size=64,lr=0.1`. Why a module of its own: the rules (workflow/rules/sweep.smk) turn names into jobs
and train configs, the summary stage (hpcdl.sweep_summary) turns them back into columns, and both must agree.

A point's name and train config depend only on its own values, never on the rest of the grid, so a grown grid
leaves the points already computed as they are (Snakemake re-runs nothing for them)."""

from __future__ import annotations

import itertools

# The train keys a sweep may vary, in the order a point's name lists them (the schema's sweep.grid propertyNames).
SWEEP_KEYS = ("train.batch_size", "train.ranks", "train.lr", "train.precision", "train.backend")

# What a point's name may look like (the `point` wildcard's constraint): key=value pairs joined by commas.
POINT_PATTERN = r"[a-z_]+=[A-Za-z0-9.+-]+(,[a-z_]+=[A-Za-z0-9.+-]+)*"


def show_value(value) -> str:
    """A value as it appears in a point's name: 64, 0.1, 1e-05, bf16."""
    return repr(value) if isinstance(value, float) else str(value)


def point_name(values: dict) -> str:
    """{'train.lr': 0.1, 'train.batch_size': 64} -> 'batch_size=64,lr=0.1' (keys in SWEEP_KEYS order)."""
    return ",".join(f"{key.split('.', 1)[1]}={show_value(values[key])}" for key in SWEEP_KEYS if key in values)


def grid_points(grid: dict) -> dict[str, dict]:
    """{point name: {swept key: value}} of every combination of the grid's values, in grid order ({} for {})."""
    keys = [key for key in SWEEP_KEYS if key in grid]
    if not keys:
        return {}
    points = {}
    for combination in itertools.product(*(grid[key] for key in keys)):
        values = dict(zip(keys, combination))
        points[point_name(values)] = values
    return points


def point_train_config(train: dict, values: dict) -> dict:
    """The train section with the point's values substituted (a new dict; `train` is left as it is)."""
    cfg = dict(train)
    for key, value in values.items():
        cfg[key.split(".", 1)[1]] = value
    return cfg


def point_tags(sweep: dict | None) -> dict:
    """MLflow tags of a point's training run: `hpcdl.sweep.point` and `hpcdl.sweep.<key>` per swept value (none
    outside a sweep). `sweep` is what rule train_sweep passes: {"point": name, "values": {key: value}}."""
    if not sweep:
        return {}
    return {"hpcdl.sweep.point": sweep["point"], **{f"hpcdl.sweep.{key}": show_value(value) for key, value in sweep["values"].items()}}
