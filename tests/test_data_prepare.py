"""prepare: conversion, stratified split, the written dataset and its manifest, and the training fast path."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from hpcdl.data.download import ChecksumError
from hpcdl.data.prepare import SPLITS, convert, load_split, read_manifest, split, write_dataset
from hpcdl.data.sources import DataError, fetch_source, load_raw
from hpcdl.loop import Normaliser


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The real scikit-learn digits (1797 images, 8x8, 10 classes of about 180 each)."""
    raw = tmp_path_factory.mktemp("digits_raw")
    provenance = fetch_source({"source": "digits"}, raw)
    return (*load_raw(raw), provenance)


@pytest.fixture(scope="module")
def prepared(digits, tmp_path_factory):
    images, labels, classes, provenance = digits
    out = tmp_path_factory.mktemp("prepared")
    manifest = write_dataset(out, images, labels, classes, image_size=16, channels=3, val_fraction=0.1,
                             test_fraction=0.2, seed=7, provenance=provenance)
    return out, manifest


# --- split -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("val_fraction,test_fraction", [(0.1, 0.2), (0.2, 0.1), (0.0, 0.25)])
def test_split_is_disjoint_complete_and_stratified(digits, val_fraction, test_fraction):
    labels = digits[1]
    parts = split(labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=0)
    assert set(parts) == set(SPLITS)
    joined = np.concatenate([parts[s] for s in SPLITS])
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)  # disjoint and complete
    per_class = np.bincount(labels)
    for name, fraction in (("train", 1 - val_fraction - test_fraction), ("val", val_fraction), ("test", test_fraction)):
        counts = np.bincount(labels[parts[name]], minlength=len(per_class))
        # within one sample per class of the exact proportion (each stratified train_test_split rounds per class)
        np.testing.assert_array_less(np.abs(counts - per_class * fraction), 1 + 1e-9)


def test_split_is_deterministic_per_seed(digits):
    labels = digits[1]
    a = split(labels, val_fraction=0.1, test_fraction=0.2, seed=3)
    b = split(labels, val_fraction=0.1, test_fraction=0.2, seed=3)
    c = split(labels, val_fraction=0.1, test_fraction=0.2, seed=4)
    assert all(np.array_equal(a[s], b[s]) for s in SPLITS)
    assert not all(np.array_equal(a[s], c[s]) for s in SPLITS)


def test_split_rejects_impossible_fractions():
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(DataError, match="val_fraction=0.6"):
        split(labels, val_fraction=0.6, test_fraction=0.5, seed=0)
    with pytest.raises(DataError, match="stratified"):
        split(np.array([0, 0, 0, 1]), val_fraction=0.0, test_fraction=0.5, seed=0)  # class 1 has one member


# --- convert ----------------------------------------------------------------------------------------------------
def test_convert_gray_to_rgb_and_resize_8_to_28():
    gray = np.random.default_rng(0).integers(0, 256, (5, 1, 8, 8), dtype=np.uint8)
    out = convert(gray, image_size=28, channels=3)
    assert out.shape == (5, 3, 28, 28) and out.dtype == np.uint8
    assert np.array_equal(out[:, 0], out[:, 1]) and np.array_equal(out[:, 1], out[:, 2])


def test_convert_rgb_to_gray_uses_luma_weights():
    rgb = np.zeros((3, 3, 4, 4), dtype=np.uint8)
    for i in range(3):
        rgb[i, i] = 255  # pure red, green, blue
    out = convert(rgb, image_size=4, channels=1)
    assert out.shape == (3, 1, 4, 4)
    np.testing.assert_array_equal(out[:, 0, 0, 0], np.round(255 * np.array([0.2989, 0.587, 0.114])))


def test_convert_constant_image_survives_resize_and_identity_is_unchanged():
    flat = np.full((2, 3, 32, 32), 200, dtype=np.uint8)
    assert np.all(convert(flat, image_size=7, channels=3) == 200)  # antialiased bilinear keeps constants
    np.testing.assert_array_equal(convert(flat, image_size=32, channels=3), flat)


@pytest.mark.parametrize("shape, size, channels", [
    ((40, 1, 8, 8), 28, 1),     # digits upscaled, as the default pipeline's fine-tuning data
    ((20, 3, 32, 32), 5, 1),    # RGB downscaled 6x to gray: the filter's support widens
    ((20, 3, 9, 9), 5, 3),
    ((20, 1, 28, 28), 32, 3),   # gray -> RGB, upscaled
])
def test_convert_equals_torchs_antialiased_bilinear_but_for_ties(shape, size, channels):
    """Pillow's filter is the one torch's interpolate(antialias=True) reproduces: the same values to float rounding,
    so after rounding to uint8 they differ by at most 1, and only where torch's value is within 1e-3 of a .5 tie."""
    import torch.nn.functional as F

    images = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    x = torch.from_numpy(images).float()
    if shape[1] == 3 and channels == 1:
        r, g, b = x.unbind(1)
        x = (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).expand(-1, channels, -1, -1)
    ours = convert(images, image_size=size, channels=channels).astype(int)
    torchs = x.round().clamp(0, 255).int().numpy()
    differs = ours != torchs
    assert np.abs(ours - torchs).max() <= 1
    near_tie = np.abs(x.numpy() - np.floor(x.numpy()) - 0.5) < 1e-3
    assert not np.any(differs & ~near_tie), "convert differs from torch away from a rounding tie"


def test_preprocessing_never_imports_torch(tmp_path):
    """Rule preprocess's job runs without torch's import (1.4 s, ~4 s in the SIF): converting and writing a
    dataset that needs resizing and a channel change loads no torch module."""
    script = (
        "import sys, numpy as np; from hpcdl.data.prepare import write_dataset; "
        "x = np.random.default_rng(0).integers(0, 256, (60, 3, 8, 8), dtype=np.uint8); y = np.arange(60) % 3; "
        f"write_dataset({str(tmp_path)!r}, x, y, ['a', 'b', 'c'], image_size=12, channels=1, val_fraction=0.2, "
        "test_fraction=0.2, seed=0, provenance={'source': 't'}); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"
    assert read_manifest(tmp_path)["splits"]["train"]["x_shape"][1:] == [1, 12, 12]


# --- written dataset ---------------------------------------------------------------------------------------------
def test_written_dataset_matches_manifest(prepared, digits):
    out, manifest = prepared
    assert manifest == read_manifest(out) == json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == digits[2] and manifest["num_classes"] == 10
    assert manifest["provenance"]["source"] == "digits"
    assert manifest["params"] == {"image_size": 16, "channels": 3, "val_fraction": 0.1, "test_fraction": 0.2,
                                  "seed": 7}
    total = 0
    for name in SPLITS:
        x, y = load_split(out, name, verify=True)
        assert isinstance(x, np.memmap) and x.dtype == np.uint8 and y.dtype == np.int64
        assert list(x.shape) == manifest["splits"][name]["x_shape"] and x.shape[1:] == (3, 16, 16)
        assert manifest["splits"][name]["n"] == len(y)
        assert manifest["splits"][name]["class_counts"] == np.bincount(y, minlength=10).tolist()
        total += len(y)
    assert total == 1797
    assert sorted(manifest["files"]) == sorted(f"{s}_{k}.npy" for s in SPLITS for k in "xy")
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], "manifest.json"])  # no temps


def test_manifest_mean_std_match_the_written_train_split(prepared):
    out, manifest = prepared
    x, _ = load_split(out, "train", mmap=False)
    assert not isinstance(x, np.memmap)
    scaled = x.astype(np.float64) / 255.0
    np.testing.assert_allclose(manifest["mean"], scaled.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(manifest["std"], scaled.std(axis=(0, 2, 3)), rtol=1e-8)


def test_written_images_are_the_converted_originals(prepared, digits):
    out, _ = prepared
    images, labels = digits[0], digits[1]
    expected = convert(images, image_size=16, channels=3)
    idx = split(labels, val_fraction=0.1, test_fraction=0.2, seed=7)["val"]
    x, y = load_split(out, "val")
    np.testing.assert_array_equal(x, expected[idx])
    np.testing.assert_array_equal(y, labels[idx])


def test_load_split_verify_names_a_tampered_file(digits, tmp_path):
    images, labels, classes, provenance = digits
    write_dataset(tmp_path, images, labels, classes, image_size=8, channels=1, val_fraction=0.1,
                  test_fraction=0.1, seed=0, provenance=provenance)
    load_split(tmp_path, "test", verify=True)
    x = np.load(tmp_path / "test_x.npy")
    x[0, 0, 0, 0] ^= 1
    np.save(tmp_path / "test_x.npy", x)
    load_split(tmp_path, "test")  # without verify the change goes unnoticed
    with pytest.raises(ChecksumError, match="test_x.npy"):
        load_split(tmp_path, "test", verify=True)


def test_load_split_errors_name_split_and_missing_manifest(prepared, tmp_path):
    with pytest.raises(DataError, match="'holdout'"):
        load_split(prepared[0], "holdout")
    with pytest.raises(DataError, match="manifest.json"):
        load_split(tmp_path, "train")


def test_rewrite_removes_the_old_manifest_before_writing(digits, tmp_path):
    images, labels, classes, provenance = digits
    kwargs = dict(image_size=8, channels=1, val_fraction=0.1, test_fraction=0.1, seed=0, provenance=provenance)
    write_dataset(tmp_path, images, labels, classes, **kwargs)
    with pytest.raises(DataError):
        write_dataset(tmp_path, images, labels[:-1], classes, **kwargs)  # fails part-way
    assert not (tmp_path / "manifest.json").exists()


# --- fast path ----------------------------------------------------------------------------------------------------
def test_normaliser_normalises_per_channel(prepared):
    out, manifest = prepared
    x, _ = load_split(out, "train")
    batch = x[:64]  # a read-only memmap slice, as training passes it
    got = Normaliser(manifest["mean"], manifest["std"])(batch)
    mean = np.array(manifest["mean"])[None, :, None, None]
    std = np.array(manifest["std"])[None, :, None, None]
    expected = (np.asarray(batch, dtype=np.float64) / 255.0 - mean) / std
    assert got.dtype == torch.float32 and got.shape == (64, 3, 16, 16)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    same = Normaliser(manifest["mean"], manifest["std"])(torch.from_numpy(np.array(batch)))
    torch.testing.assert_close(same, got)
    with pytest.raises(DataError, match="uint8"):
        Normaliser(manifest["mean"], manifest["std"])(np.zeros((2, 3, 4, 4), dtype=np.float32))


def test_normalised_train_split_has_zero_mean_unit_std(prepared):
    out, manifest = prepared
    x, _ = load_split(out, "train")
    t = Normaliser(manifest["mean"], manifest["std"])(x).double()
    torch.testing.assert_close(t.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.std(dim=(0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64),
                               atol=1e-5, rtol=0)
