"""Atomic file output: a file only ever appears under its final name once complete (fsynced), so a kill at any
instant leaves the old file, no file, or the whole new one. Used for every output a later step trusts:
downloads, preprocessed arrays, checkpoints, model files, metrics."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(dest, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success fsync it and os.replace it onto `dest`,
    on any error (including KeyboardInterrupt) delete it. Readers therefore see either the old file,
    no file, or the complete new one - never a partial write."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj, path) -> None:
    import torch

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
