"""Where a stage's seconds go: the time from the start of its process (interpreter and imports) through MLflow
set-up, data loading, epochs and model logging, logged with the stage's run as metrics `seconds.<phase>` (and
read back by bench/p4_pipeline.py). Cheap: a clock read per phase. No torch or MLflow imports."""

from __future__ import annotations

import os
import resource
import time


def process_started() -> float:
    """Wall-clock time this process started (from /proc: the kernel's record, before the interpreter ran)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageClock:
    """Accumulates wall time per named phase; the first phase, `startup`, runs from the process's start."""

    def __init__(self):
        now = time.time()
        self.seconds: dict[str, float] = {"startup": max(now - process_started(), 0.0)}
        self._last = now

    def mark(self, phase: str) -> None:
        """The time since the previous mark goes to `phase`."""
        now = time.time()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def metrics(self) -> dict[str, float]:
        total = sum(self.seconds.values()) + time.time() - self._last
        return {**{f"seconds.{phase}": round(value, 3) for phase, value in self.seconds.items()}, "seconds.total": round(total, 3)}
