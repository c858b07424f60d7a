"""Fixtures of the tests that look at MLflow as a person does: a real `mlflow server` on a store, and Debian's
chromium driven by Playwright (Playwright's own browser download needs the internet; Debian's package does not).

    chromium      session: path of the chromium binary (apt-get installs Debian's package when missing, as root)
    mlflow_ui     factory: mlflow_ui(backend_store_uri, artifacts_dir) -> base URL of a server started for the test
    browser_page  factory: browser_page(**context_options) -> a Playwright page in a fresh headless chromium context
Root on Debian to install; skipped elsewhere, failed under CI=true (require_or_fail)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import apt_install, require_or_fail

CHROMIUM = "/usr/bin/chromium"
# As the machine's probe starts it: no sandbox (root), no GPU, and no background traffic to hosts this network
# refuses (the browser would otherwise retry them at every start).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium() -> str:
    if not Path(CHROMIUM).exists() and shutil.which("apt-get") and Path("/etc/debian_version").exists():
        require_or_fail(subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0", "installing chromium needs root")
        # Without recommends: they add avahi-daemon (a system user and an mDNS daemon) that a headless test never uses.
        apt_install("chromium", recommends=False)
    require_or_fail(Path(CHROMIUM).exists(), "Debian's chromium is not installed (apt-get install chromium)")
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError as error:
            if getattr(error, "code", None) in (401, 403):  # up, but wants credentials
                return
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture
def mlflow_ui(tmp_path):
    """Start `mlflow server` on a store (and stop it after the test); returns its base URL."""
    servers = []

    def start(backend_store_uri: str, artifacts_dir: Path, *extra: str) -> str:
        port = free_port()
        command = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", backend_store_uri,
                   "--artifacts-destination", str(artifacts_dir), "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *extra]
        log = open(tmp_path / f"mlflow-server-{port}.log", "w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        servers.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/health", process=process)
        return url

    yield start
    for process in servers:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def browser_page(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)

        def page(**context_options):
            return browser.new_context(viewport={"width": 1400, "height": 900}, **context_options).new_page()

        yield page
        browser.close()
