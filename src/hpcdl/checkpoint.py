"""Crash-safe checkpoints: written to a temporary file in the same folder, fsynced, then renamed over the old
one, so a kill at any instant leaves either the previous complete checkpoint or the new complete one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def config_digest(obj) -> str:
    """Identifies the settings a checkpoint was made with; resuming under other settings would mix two runs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointStore:
    """One training phase's checkpoint file, tied to the digest of the settings that produced it."""

    def __init__(self, path: Path, digest: str):
        self.path = Path(path)
        self.digest = digest

    def load(self) -> dict | None:
        """The saved state if it belongs to these settings. A checkpoint of other settings is kept aside
        (renamed *.stale-<digest>.pt, never deleted) and training starts fresh."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as error:  # a foreign or damaged file: keep it for inspection, do not train on it
            raise RuntimeError(f"checkpoint {self.path} cannot be read ({error}); move it away to start fresh") from error
        if state.get("digest") != self.digest:
            aside = self.path.with_name(f"{self.path.stem}.stale-{state.get('digest')}.pt")
            os.replace(self.path, aside)
            print(f"hpcdl: {self.path} was made with other settings; kept as {aside}, starting fresh", flush=True)
            return None
        return state

    def save(self, state: dict) -> None:
        atomic_torch_save({**state, "digest": self.digest}, self.path)
