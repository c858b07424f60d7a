"""P8: how much longer a stage takes to start in the Apptainer image than on the host.

For each stage module, times `python -m hpcdl.<stage> --help` (interpreter start, the stage's imports, argument
parsing: everything a stage does before its work) on the host (this checkout's venv) and in the image
(`apptainer exec <image> python -m hpcdl.<stage> --help`), measured side by side in this one run:
  cold  after dropping the kernel's page cache (root only: `echo 3 > /proc/sys/vm/drop_caches`), so both read
        their files from disk: the venv's from the file system, the image's from its squashfs (decompressed)
  warm  the median of --repeat runs right after.
--sandbox DIR: also time the image unpacked into DIR (`apptainer build --sandbox`, as rule unpack_image does for
`container_sandbox`; unpacked here first when DIR does not exist), in the same run.
--as-user NAME (root only): run both as that user, the way users run them: an unprivileged apptainer mounts the
image with squashfuse (FUSE), while root's apptainer mounts it with the kernel's squashfs. The page cache is still
dropped as root. The user needs /dev/fuse, and read access to this checkout and the image.
--check: exit 1 unless the form the workflow would run (the sandbox when given, else the SIF) is within 2 s of the
host, cold and warm, for every stage."""

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
    parser.add_argument("--sandbox", type=Path, metavar="DIR", help="also time the image unpacked into DIR")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    as_user = ["runuser", "-u", args.as_user, "--"] if args.as_user else []
    if as_user and os.geteuid() != 0:
        raise SystemExit("--as-user needs root (runuser)")
    apptainer = shutil.which("apptainer")
    if apptainer is None or not args.image.exists():
        raise SystemExit(f"needs apptainer on PATH and the image {args.image} (snakemake build_images)")
    images = {"sif": args.image}
    if args.sandbox:
        if not args.sandbox.exists():
            started = time.monotonic()
            subprocess.run([*as_user, apptainer, "build", "--sandbox", str(args.sandbox), str(args.image)], check=True, capture_output=True)
            print(f"unpacked {args.image.name} into {args.sandbox} in {time.monotonic() - started:.1f} s")
        images["sandbox"] = args.sandbox
    env = dict(os.environ, MPLCONFIGDIR=os.environ.get("MPLCONFIGDIR", "/tmp"))
    commands = {"host": lambda stage: [*as_user, sys.executable, "-m", f"hpcdl.{stage}", "--help"]}
    for form, image in images.items():
        commands[form] = lambda stage, image=image: [*as_user, apptainer, "exec", str(image), "python", "-m", f"hpcdl.{stage}", "--help"]
    checked = "sandbox" if args.sandbox else "sif"
    who = f"as {args.as_user}" if args.as_user else f"as uid {os.geteuid()}"
    print(f"`python -m hpcdl.<stage> --help`: host venv, {args.image.name}" + (f", {args.sandbox} (sandbox)" if args.sandbox else "")
          + f"; {who}; seconds (cold: page cache dropped first), each form's difference to the host")
    header = f"{'stage':12s}{'host cold':>10s}" + "".join(f"{form + ' cold':>14s}{'diff':>7s}" for form in images)
    header += f"{'host warm':>11s}" + "".join(f"{form + ' warm':>14s}{'diff':>7s}" for form in images)
    print(header)
    worst = {form: 0.0 for form in images}
    for stage in STAGES:
        cold = {}
        for where, command in commands.items():
            cold[where] = timed(command(stage), env) if drop_page_cache() else float("nan")
        warm = {where: statistics.median(timed(command(stage), env) for _ in range(args.repeat)) for where, command in commands.items()}
        line = f"{stage:12s}{cold['host']:10.2f}"
        for form in images:
            cold_diff, warm_diff = cold[form] - cold["host"], warm[form] - warm["host"]
            worst[form] = max(worst[form], warm_diff, cold_diff if cold_diff == cold_diff else 0.0)
            line += f"{cold[form]:14.2f}{cold_diff:+7.2f}"
        line += f"{warm['host']:11.2f}" + "".join(f"{warm[form]:14.2f}{warm[form] - warm['host']:+7.2f}" for form in images)
        print(line)
    for form in images:
        print(f"largest difference, {form}: {worst[form]:+.2f} s (target <= +{MARGIN_S:.0f} s)")
    return 1 if args.check and worst[checked] > MARGIN_S else 0


if __name__ == "__main__":
    sys.exit(main())
