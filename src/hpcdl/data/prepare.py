"""Turn decoded raw images into the preprocessed dataset training reads, and read it back fast.

The dataset is stored as uint8 (N,C,H,W) .npy files per split: 4x smaller than float32, memory-mappable
by every MPI rank at once without copies, and normalised per batch on the fly by hpcdl.loop's Normaliser (whole
batch tensor ops, no per-sample PIL work). manifest.json is written last, so it existing means every
split file is complete; it carries the sha256 of each file, the class counts and the train mean/std.

Images are resized with Pillow, not torch: Pillow's antialiased bilinear filter is the one torch's
`interpolate(..., antialias=True)` reproduces (the two agree to 1e-3 before rounding, tests/test_data_prepare.py), and
rule preprocess then never imports torch (1.4 s on the host, ~4 s from the SIF, on the critical path of the default
pipeline: train waits for both datasets' preprocess jobs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hpcdl.atomic import atomic_output, atomic_write_json
from hpcdl.data.download import ChecksumError, sha256_file
from hpcdl.data.formats import DataError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


# --- transforms -----------------------------------------------------------------------------------------
def convert(images: np.ndarray, *, image_size: int, channels: int) -> np.ndarray:
    """uint8 (N,C,H,W) -> uint8 (N,channels,image_size,image_size).

    RGB->gray uses the ITU-R 601 luma weights, gray->RGB repeats the channel; resizing is bilinear with
    antialiasing (Pillow's filter, whose support widens when downscaling) so downscaling does not alias. One image
    at a time in float32, rounded half to even and clipped back to uint8: the working memory is one image's."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"convert expects uint8 (N,C,H,W) images, got {images.dtype}{images.shape}")
    if channels not in (1, 3) or images.shape[1] not in (1, 3):
        raise DataError(f"channels must be 1 or 3: asked for {channels}, images have {images.shape[1]}")
    if image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    n, c, h, w = images.shape
    if c == channels and h == w == image_size:
        return np.ascontiguousarray(images)
    from PIL import Image

    def resized(plane: np.ndarray) -> np.ndarray:  # float32 (H, W): Pillow's mode F, computed in floating point
        return np.asarray(Image.fromarray(plane).resize((image_size, image_size), Image.Resampling.BILINEAR))

    out = np.empty((n, channels, image_size, image_size), dtype=np.uint8)
    weights = np.array(LUMA_WEIGHTS, dtype=np.float32)[:, None, None]
    for i in range(n):
        planes = images[i].astype(np.float32)
        if c == 3 and channels == 1:  # reduce before resizing: a third of the interpolation work
            planes = (planes * weights).sum(axis=0, keepdims=True)
        if (h, w) != (image_size, image_size):
            planes = np.stack([resized(plane) for plane in planes])
        out[i] = np.clip(np.rint(planes), 0, 255)  # (1, S, S) broadcasts over 3 channels: gray -> RGB after resizing
    return out


def split(labels: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded, stratified train/val/test index split (disjoint, covering every example, each sorted).

    Two stratified train_test_split calls: test off the whole set, then val off the rest, with val's share
    rescaled so both fractions refer to the whole dataset."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) "
                        "and sum to less than 1")
    labels = np.asarray(labels)
    index = np.arange(len(labels))

    def take(idx, fraction, salt):
        if fraction == 0:
            return idx, idx[:0]
        try:
            from sklearn.model_selection import train_test_split

            return train_test_split(idx, test_size=fraction, stratify=labels[idx], random_state=seed + salt)
        except ValueError as exc:
            raise DataError(f"cannot split {len(idx)} examples stratified with fraction {fraction:.4g} "
                            f"(val_fraction={val_fraction}, test_fraction={test_fraction}): {exc}") from exc

    rest, test = take(index, test_fraction, 0)
    train, val = take(rest, val_fraction / (1 - test_fraction), 1)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 (N,C,H,W) in 0..1 units, accumulated in float64
    chunks so a large train split never becomes one big float array."""
    c = x.shape[1]
    total, total_sq, count = np.zeros(c), np.zeros(c), x.shape[0] * x.shape[2] * x.shape[3]
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk].astype(np.float64) / 255.0
        total += part.sum(axis=(0, 2, 3))
        total_sq += np.square(part).sum(axis=(0, 2, 3))
    if count == 0:
        raise DataError("cannot compute normalisation statistics of an empty train split")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()


# --- writing --------------------------------------------------------------------------------------------
def _save_npy(path: Path, array: np.ndarray) -> str:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a tmp path
            np.save(f, array, allow_pickle=False)
    return sha256_file(path)


def write_dataset(out_dir: Path, images, labels, classes, *, image_size, channels, val_fraction, test_fraction,
                  seed, provenance: dict) -> dict:
    """Convert, split and write {split}_x.npy / {split}_y.npy, then manifest.json last (atomic). Returns
    the manifest."""
    out_dir = Path(out_dir)
    # plain Python numbers: callers may pass numpy scalars, which json cannot write
    image_size, channels, seed = int(image_size), int(channels), int(seed)
    val_fraction, test_fraction = float(val_fraction), float(test_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    x = convert(np.asarray(images), image_size=image_size, channels=channels)
    indices = split(labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)

    files, splits = {}, {}
    for name in SPLITS:
        xs, ys = x[indices[name]], labels[indices[name]]
        files[f"{name}_x.npy"] = _save_npy(out_dir / f"{name}_x.npy", xs)
        files[f"{name}_y.npy"] = _save_npy(out_dir / f"{name}_y.npy", ys)
        splits[name] = {"n": int(len(ys)), "x_shape": list(xs.shape),
                        "class_counts": np.bincount(ys, minlength=len(classes)).tolist()}
        if name == "train":
            mean, std = channel_stats(xs)

    manifest = {
        "classes": list(classes), "num_classes": len(classes), "image_size": image_size, "channels": channels,
        "splits": splits, "mean": mean, "std": std, "files": files, "provenance": provenance,
        "params": {"image_size": image_size, "channels": channels, "val_fraction": val_fraction,
                   "test_fraction": test_fraction, "seed": seed},
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


# --- reading --------------------------------------------------------------------------------------------
def read_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found: {data_dir} is not a prepared dataset or its preparation did not finish")
    return json.loads(path.read_text())


def load_split(data_dir: Path, split: str, *, mmap: bool = True, verify: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (N,C,H,W), y int64 (N,)) of one split; x memory-mapped read-only by default so every rank
    on a node shares the page cache instead of holding its own copy."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    x_path, y_path = data_dir / f"{split}_x.npy", data_dir / f"{split}_y.npy"
    if verify:
        for path in (x_path, y_path):
            expected = manifest["files"].get(path.name)
            if expected is None:
                raise DataError(f"{path.name} is not listed in {data_dir / MANIFEST}")
            actual = sha256_file(path)
            if actual != expected:
                raise ChecksumError(str(path), expected, actual)
    x = np.load(x_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    y = np.load(y_path, allow_pickle=False)
    if len(x) != len(y):
        raise DataError(f"{x_path} holds {len(x)} images but {y_path} {len(y)} labels")
    return x, y
