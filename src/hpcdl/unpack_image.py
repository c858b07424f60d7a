"""Rule `unpack_image` (on the submitting host, with `container_sandbox` set): unpack the stage image into a sandbox
folder (`apptainer build --sandbox`) that the stages then run from.

Why: an unprivileged Apptainer reads a SIF image through squashfuse, a FUSE mount made anew by every `apptainer
exec`, so each stage reads torch's 3 GB of libraries through it again: `import torch` takes 3.8-4.2 s in the SIF vs
1.3-1.7 s on the host. From an ordinary folder the page cache serves them as it does on the host (README, P8).

The SIF is checked against its .sha256 first, and the folder appears under its final name only once complete,
with `<folder>.sha256` beside it naming the SIF it came from (the line of the SIF's own .sha256): record_image
compares the two, so a run is always tagged with the digest of the image its sandbox was unpacked from. The rule
declares only that file as its output, not the folder: Snakemake deletes a directory output before its job runs,
and `container_sandbox` naming a folder of the user's by mistake must not cost them that folder."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hpcdl.atomic import atomic_write_text
from hpcdl.record_image import sandbox_digest_file, verified_sha256


def is_unpacked_hpcdl_image(folder: Path) -> bool:
    """A folder an earlier unpack made (an Apptainer sandbox whose labels name an hpcdl flavour): the only kind of
    existing folder unpack replaces. Anything else at that path is the user's and is left alone."""
    labels = folder / ".singularity.d" / "labels.json"
    try:
        return "hpcdl.flavour" in json.loads(labels.read_text())
    except (OSError, ValueError):
        return False


def unpack(image: Path, digest_file: Path, sandbox: Path, binary: str) -> str:
    """Unpack `image` into `sandbox` (absent, empty, or an earlier unpack, which is replaced once the new one is
    complete) and return the image's sha256."""
    actual = verified_sha256(image, digest_file, "unpack_image")
    if sandbox.is_dir() and not any(sandbox.iterdir()):
        sandbox.rmdir()  # an empty folder made for it is a free place
    replaced = sandbox.exists()
    if replaced and not is_unpacked_hpcdl_image(sandbox):
        raise SystemExit(
            f"unpack_image: container_sandbox={sandbox} exists and is not an hpcdl image unpacked earlier (no "
            ".singularity.d/labels.json naming hpcdl.flavour); it is left as it is. Name a new or empty folder."
        )
    sandbox.parent.mkdir(parents=True, exist_ok=True)
    partial = sandbox.with_name(f".{sandbox.name}.partial-{os.getpid()}")
    previous = sandbox.with_name(f".{sandbox.name}.previous-{os.getpid()}")
    try:
        build = subprocess.run([binary, "build", "--sandbox", str(partial), str(image)], capture_output=True, text=True)
        if build.returncode != 0:
            raise SystemExit(f"unpack_image: `{binary} build --sandbox` of {image} into {sandbox.parent} failed:\n{build.stderr[-2000:]}")
        if replaced:
            os.rename(sandbox, previous)
        os.rename(partial, sandbox)
    finally:
        # a failed or interrupted unpack leaves no folder a later run could take for a whole image
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)
    atomic_write_text(sandbox_digest_file(sandbox), f"{actual}  {image.name}\n")
    return actual


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--digest", type=Path, required=True, help="the image's .sha256 file")
    parser.add_argument("--sandbox", type=Path, required=True, help="the folder to create")
    parser.add_argument("--apptainer", default="apptainer", help="apptainer binary Snakemake runs")
    args = parser.parse_args(argv)
    digest = unpack(args.image, args.digest, args.sandbox, args.apptainer)
    print(f"unpack_image: {args.image} (sha256 {digest}) unpacked into {args.sandbox}", file=sys.stderr)


if __name__ == "__main__":
    main()
