"""Shared helpers for the data-library tests: writers for small but format-exact MNIST IDX, CIFAR-10 and
image-folder datasets, and a real local HTTP server (no network mocks) that can also cut a transfer short."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """uint8 array -> gzipped IDX: magic 0x0000 08 <ndim>, big-endian uint32 dims, then the bytes."""
    assert array.dtype == np.uint8
    header = struct.pack(">I", 0x00000800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_mnist_files(folder: Path, *, n_train=40, n_test=15, side=28, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """The four MNIST .gz files with random content; returns the pooled (train then test) images (N,1,H,W)
    and labels that a correct reader must give back."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        parts.append((images, labels))
    images = np.concatenate([p[0] for p in parts])[:, None]
    return images, np.concatenate([p[1] for p in parts]).astype(np.int64)


def write_cifar10_tarball(path: Path, *, per_batch=6, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-python.tar.gz layout (cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}) with
    random content; returns the pooled images (N,3,32,32) and labels in reading order."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    images, labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("batches.meta", {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072})
        for name in names:
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            lab = rng.integers(0, 10, size=per_batch).tolist()
            add(name, {b"batch_label": name.encode(), b"data": data, b"labels": lab})
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.array(lab, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def write_imagefolder(root: Path, counts: dict[str, int], *, size=(12, 10), mode="RGB", seed=0) -> None:
    """root/<class>/<i>.png with random pixels, PIL-written."""
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(root / cls / f"{i}.png")


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """ThreadingHTTPServer on 127.0.0.1 serving tmp_path/www. Paths added to `.truncated` are answered
    with a Content-Length larger than the body, then the connection is closed."""
    for var in ("no_proxy", "NO_PROXY"):  # a cluster's http_proxy must not capture the loopback server
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    root = tmp_path / "www"
    root.mkdir()
    truncated: set[str] = set()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path not in truncated:
                return super().do_GET()
            body = (root / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 4096))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{server.server_port}/", truncated=truncated)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
