"""Crash-safe checkpoints (written atomically: hpcdl.atomic), tied to the settings that made them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from hpcdl.atomic import atomic_torch_save


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
        leftover = self.path.with_name(self.path.name + ".tmp")
        if leftover.exists():  # a kill during a write (hpcdl.atomic): never read, the last complete file stands
            leftover.unlink()
            print(f"hpcdl: removed {leftover}, a checkpoint write interrupted by a kill; {self.path} is intact", flush=True)
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
