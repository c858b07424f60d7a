"""The state of the workflow checkout (git commit and dirty flag), without importing MLflow or torch: the
Snakefile reads it at parse time and hands it to the stages, which have no git inside the Apptainer image."""

from __future__ import annotations

import os
import subprocess


def git_state() -> dict:
    """Commit and dirty flag of the checkout in the current directory; outside git (or without git, as in the
    image) the values the Snakefile exported (HPCDL_GIT_COMMIT, HPCDL_GIT_DIRTY), else 'unknown'."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"git.commit": commit, "git.dirty": str(dirty).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": os.environ.get("HPCDL_GIT_COMMIT", "unknown"), "git.dirty": os.environ.get("HPCDL_GIT_DIRTY", "unknown")}


def export_git_state() -> None:
    """Put the checkout's state in the environment (once) for the jobs this process starts."""
    if "HPCDL_GIT_COMMIT" not in os.environ:
        state = git_state()
        os.environ["HPCDL_GIT_COMMIT"] = state["git.commit"]
        os.environ["HPCDL_GIT_DIRTY"] = state["git.dirty"]
