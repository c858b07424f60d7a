"""P8: how much longer a stage takes to start in the Apptainer image than on the host.

For each stage module, times `python -m hpcdl.<stage> --help` (interpreter start, the stage's imports, argument
parsing: everything a stage does before its work) on the host (this checkout's venv) and in the image
(`apptainer exec <image> python -m hpcdl.<stage> --help`), measured side by side in this one run:
  cold  after dropping the kernel's page cache (root only: `echo 3 > /proc/sys/vm/drop_caches`), so both read
        their files from disk: the venv's from the file system, the image's from its squashfs (decompressed)
  warm  the median of --repeat runs right after.
--as-user NAME (root only): run both as that user, the way users run them: an unprivileged apptainer mounts the
image with squashfuse (FUSE), while root's apptainer mounts it with the kernel's squashfs. The page cache is still
dropped as root. The user needs /dev/fuse, and read access to this checkout and the image.
--check: exit 1 unless the image is within 2 s of the host, cold and warm, for every stage."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("fetch", "preprocess", "train", "evaluate", "finetune")
MARGIN_S = 2.0


def timed(command: list[str], env: dict) -> float:
    started = time.monotonic()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.monotonic() - started


def drop_page_cache() -> bool:
    if os.geteuid() != 0:
        return False
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=REPO / "containers" / "hpcdl-cpu.sif")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--as-user", metavar="NAME", help="run the commands as this user (root only)")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    as_user = ["runuser", "-u", args.as_user, "--"] if args.as_user else []
    if as_user and os.geteuid() != 0:
        raise SystemExit("--as-user needs root (runuser)")
    apptainer = shutil.which("apptainer")
    if apptainer is None or not args.image.exists():
        raise SystemExit(f"needs apptainer on PATH and the image {args.image} (snakemake build_images)")
    env = dict(os.environ, MPLCONFIGDIR=os.environ.get("MPLCONFIGDIR", "/tmp"))
    commands = {
        "host": lambda stage: [*as_user, sys.executable, "-m", f"hpcdl.{stage}", "--help"],
        "image": lambda stage: [*as_user, apptainer, "exec", str(args.image), "python", "-m", f"hpcdl.{stage}", "--help"],
    }
    who = f"as {args.as_user}" if args.as_user else f"as uid {os.geteuid()}"
    print(f"`python -m hpcdl.<stage> --help`, host venv vs {args.image.name}, {who}; seconds (cold: page cache dropped first)")
    print(f"{'stage':12s}{'host cold':>11s}{'image cold':>12s}{'diff':>7s}{'host warm':>11s}{'image warm':>12s}{'diff':>7s}")
    worst = 0.0
    for stage in STAGES:
        cold = {}
        for where, command in commands.items():
            cold[where] = timed(command(stage), env) if drop_page_cache() else float("nan")
        warm = {where: statistics.median(timed(command(stage), env) for _ in range(args.repeat)) for where, command in commands.items()}
        cold_diff, warm_diff = cold["image"] - cold["host"], warm["image"] - warm["host"]
        worst = max(worst, warm_diff, cold_diff if cold_diff == cold_diff else 0.0)
        print(f"{stage:12s}{cold['host']:11.2f}{cold['image']:12.2f}{cold_diff:+7.2f}{warm['host']:11.2f}{warm['image']:12.2f}{warm_diff:+7.2f}")
    print(f"largest difference: {worst:+.2f} s (target <= +{MARGIN_S:.0f} s)")
    return 1 if args.check and worst > MARGIN_S else 0


if __name__ == "__main__":
    sys.exit(main())
