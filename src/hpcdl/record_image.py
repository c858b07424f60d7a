"""Rule `record_image` (on the submitting host, when the stages run in Apptainer): check the image against the
sha256 its build wrote beside it and record image path, digest and apptainer version in one small JSON under the
results folder (with `container_sandbox`: the folder the stages run from, the SIF it was unpacked from, and that
SIF's digest). Every stage reads it (inside the container, where neither the image's folder nor apptainer are
visible) and tags its MLflow run with it, after checking that it really runs inside that image
(hpcdl.tracking.container_tags)."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

from hpcdl.atomic import atomic_write_json

def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_digest_file(path: Path, image: Path, program: str = "record_image") -> str:
    """The sha256 from a `sha256sum` line ("<hex>  <name>") written by containers/build-image.sh."""
    fields = path.read_text().split()
    if len(fields) != 2 or len(fields[0]) != 64 or fields[1] != image.name:
        raise SystemExit(f"{program}: {path} is not a sha256sum line for {image.name}: {path.read_text()!r}")
    return fields[0]


def verified_sha256(image: Path, digest_file: Path, program: str = "record_image") -> str:
    """The image's sha256, hashed and checked against the line its build wrote: a changed image stops `program`."""
    expected = read_digest_file(digest_file, image, program)
    actual = file_sha256(image)
    if actual != expected:
        raise SystemExit(
            f"{program}: {image} has sha256 {actual}, but {digest_file} says {expected}: the image changed after "
            "its build. Rebuild it (snakemake build_images) rather than run stages from an image nobody can name."
        )
    return actual


def sandbox_digest_file(sandbox: Path) -> Path:
    """Where the digest of the SIF an unpacked folder came from is kept: beside the folder, never inside the image."""
    return sandbox.with_name(sandbox.name + ".sha256")


def apptainer_version(binary: str) -> str:
    """`apptainer --version` prints 'apptainer version 1.4.5'; the version is the last word."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.split()
    return out[-1]


def record(image: Path, digest_file: Path, binary: str, sandbox: Path | None = None) -> dict:
    if sandbox is not None:
        return record_sandbox(image, read_digest_file(digest_file, image), binary, sandbox)
    actual = verified_sha256(image, digest_file)
    return {"image": str(image.resolve()), "sha256": actual, "apptainer": apptainer_version(binary)}


def record_sandbox(image: Path, expected: str, binary: str, sandbox: Path) -> dict:
    """The stages run from `sandbox`: it must be the one unpack_image made from the image the .sha256 names (it
    checked the image's digest when it unpacked it, so the 3 GB are not hashed a second time here)."""
    sandbox_digest = sandbox_digest_file(sandbox)
    if not (sandbox / ".singularity.d").is_dir() or not sandbox_digest.is_file():
        raise SystemExit(f"record_image: {sandbox} is not an image unpacked by unpack_image (no .singularity.d in it or no {sandbox_digest.name} beside it)")
    unpacked_from = read_digest_file(sandbox_digest, image)
    if unpacked_from != expected:
        raise SystemExit(
            f"record_image: {sandbox} was unpacked from an image with sha256 {unpacked_from} ({sandbox_digest}), "
            f"but {image} is {expected}. Remove the folder and its .sha256 to unpack the image again."
        )
    return {"image": str(sandbox.resolve()), "sha256": expected, "unpacked_from": str(image.resolve()), "apptainer": apptainer_version(binary)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--digest", type=Path, required=True, help="the image's .sha256 file")
    parser.add_argument("--apptainer", default="apptainer", help="apptainer binary Snakemake runs")
    parser.add_argument("--sandbox", type=Path, help="the folder unpack_image unpacked the image into, which the stages run from")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    info = record(args.image, args.digest, args.apptainer, args.sandbox)
    atomic_write_json(args.out, info)
    print(f"record_image: {info['image']} sha256 {info['sha256']} (apptainer {info['apptainer']})", file=sys.stderr)


if __name__ == "__main__":
    main()
