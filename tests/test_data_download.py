"""download(): verified, atomic, re-runnable - against a real HTTP server on 127.0.0.1."""

import hashlib
import os

import pytest

from hpcdl.atomic import atomic_output
from hpcdl.data.download import ChecksumError, download, sha256_file

PAYLOAD = os.urandom(3 << 19)  # 1.5 MiB: more than one download chunk (1 MiB)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert sha256_file(path) == DIGEST


def test_download_verifies_and_places_file(http_server, tmp_path):
    (http_server.root / "f.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "f.bin"
    assert download(http_server.url + "f.bin", dest, DIGEST) == dest
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == ["f.bin"]


def test_existing_good_file_is_not_downloaded_again(http_server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(PAYLOAD)
    # nothing is served at this URL: any request would fail
    assert download(http_server.url + "absent.bin", dest, DIGEST) == dest


def test_existing_bad_file_is_replaced(http_server, tmp_path):
    (http_server.root / "f.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"stale")
    download(http_server.url + "f.bin", dest, DIGEST)
    assert dest.read_bytes() == PAYLOAD


def test_corrupt_download_raises_leaves_nothing_then_rerun_succeeds(http_server, tmp_path):
    served = http_server.root / "f.bin"
    served.write_bytes(b"not the pinned bytes")
    url, dest = http_server.url + "f.bin", tmp_path / "dl" / "f.bin"
    with pytest.raises(ChecksumError) as err:
        download(url, dest, DIGEST)
    message = str(err.value)
    assert url in message and DIGEST in message and hashlib.sha256(b"not the pinned bytes").hexdigest() in message
    assert leftovers(dest.parent) == []  # neither dest nor dest.part

    served.write_bytes(PAYLOAD)
    download(url, dest, DIGEST)
    assert dest.read_bytes() == PAYLOAD and leftovers(dest.parent) == ["f.bin"]


def test_truncated_transfer_raises_naming_url_and_leaves_nothing(http_server, tmp_path):
    (http_server.root / "f.bin").write_bytes(PAYLOAD)
    http_server.truncated.add("/f.bin")
    url, dest = http_server.url + "f.bin", tmp_path / "dl" / "f.bin"
    with pytest.raises(RuntimeError, match="f.bin") as err:
        download(url, dest, DIGEST)
    assert url in str(err.value)
    assert leftovers(dest.parent) == []


def test_http_error_names_url_and_leaves_nothing(http_server, tmp_path):
    url, dest = http_server.url + "missing.bin", tmp_path / "dl" / "missing.bin"
    with pytest.raises(RuntimeError) as err:
        download(url, dest, DIGEST)
    assert url in str(err.value) and "404" in str(err.value)
    assert leftovers(dest.parent) == []


def test_failed_redownload_over_a_bad_file_leaves_nothing_at_dest(http_server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"stale")
    with pytest.raises(RuntimeError):
        download(http_server.url + "missing.bin", dest, DIGEST)
    assert not dest.exists()


def test_atomic_output_removes_temporary_on_error(tmp_path):
    dest = tmp_path / "x.txt"
    with pytest.raises(KeyError):
        with atomic_output(dest) as tmp:
            tmp.write_text("half")
            raise KeyError("interrupted")
    assert leftovers(tmp_path) == []
