"""Verified downloads and atomic file output.

A file only ever appears under its final name after it is complete (and, for downloads, after its sha256
matched the pinned digest), so the presence of a file is proof of its integrity and a re-run after any
failure simply starts over."""

from __future__ import annotations

import contextlib
import hashlib

import sys
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

from hpcdl.atomic import atomic_output

CHUNK_BYTES = 1 << 20
USER_AGENT = "hpcdl-data/0.1 (+urllib)"  # some dataset hosts refuse urllib's default agent


class ChecksumError(RuntimeError):
    """A file's sha256 differs from the digest it was pinned to."""

    def __init__(self, source: str, expected: str, actual: str):
        super().__init__(f"sha256 mismatch for {source}: expected {expected}, got {actual}")
        self.source, self.expected, self.actual = source, expected, actual


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in chunks (files can be larger than memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _progress_bar(total: int | None, url: str):
    """tqdm bar on interactive terminals only: batch logs stay free of carriage-return noise."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=url.rsplit("/", 1)[-1])


def _stream(url: str, out_path: Path, timeout: float) -> str:
    """Stream `url` into `out_path`; return the sha256 of the bytes received.

    http.client raises IncompleteRead when the server closes before Content-Length bytes arrived,
    so a truncated transfer surfaces as an exception rather than a short file."""
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(out_path, "wb") as out:
        size = response.headers.get("Content-Length")  # file:// responses have headers but no .length
        with _progress_bar(int(size) if size else None, url) as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str, *, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` and verify it against the pinned `sha256`.

    Returns at once when `dest` already holds the right bytes. On a digest mismatch raises ChecksumError,
    on a failed or truncated transfer a RuntimeError naming the URL; either way nothing is left at `dest`
    or at `dest`.part, so re-running downloads again."""
    dest = Path(dest)
    sha256 = sha256.lower()
    if dest.exists():
        if sha256_file(dest) == sha256:
            return dest
        dest.unlink()  # stale or corrupt: must not survive a failed re-download
    try:
        with atomic_output(dest, suffix=".part") as part:
            actual = _stream(url, part, timeout)
            if actual != sha256:
                raise ChecksumError(url, sha256, actual)
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # an HTTPError holds the open response; do not leave its socket to the GC
        raise RuntimeError(f"download of {url} to {dest} failed: {exc!r}") from exc
    return dest
