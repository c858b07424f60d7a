"""Fixtures of the tracking-server tests: a real PostgreSQL (Debian's, a private cluster in a temporary folder) and
`python -m hpcdl.tracking_server serve` on it with MLflow's basic-auth app, as a group would run it.

    postgres        session: a PostgreSQL server on a free port; role and database `mlflow` (password in a pgpass file)
    tracking_server session: the MLflow server (on every interface, reached by this machine's host name), with the
                    users alice and bob created through the auth API, each with a home whose ~/.mlflow/credentials
                    holds their password; .stop() and .start() for the tests that take it down
Root on Debian (installs postgresql when missing; starts it as the postgres user); skipped elsewhere, failed under
CI=true."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from browser_fixtures import free_port, wait_for_http
from conftest import apt_install, require_or_fail


@dataclass(frozen=True)
class Credentials:
    name: str
    password: str
    home: Path  # a home folder whose .mlflow/credentials holds the user's name and password

    def env(self, **extra) -> dict:
        """An environment in which MLflow finds these credentials (HOME, not variables: nothing to leak into logs)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(HOME=str(self.home), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)
        return env


def write_credentials(home: Path, name: str, password: str, owner: tuple[int, int] | None = None) -> Path:
    folder = home / ".mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "credentials"
    path.write_text(f"[mlflow]\nmlflow_tracking_username = {name}\nmlflow_tracking_password = {password}\n")
    path.chmod(0o600)
    if owner:
        for item in (folder, path):
            os.chown(item, *owner)
    return path


@dataclass
class Postgres:
    uri: str          # postgresql+psycopg://mlflow@127.0.0.1:<port>/mlflow (no password)
    pgpass: Path      # libpq's password file for it
    password: str


@pytest.fixture(scope="session")
def postgres():
    require_or_fail(os.geteuid() == 0 and Path("/etc/debian_version").exists(), "the tracking-server tests start PostgreSQL: root on Debian")
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        apt_install("postgresql")
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    require_or_fail(bool(binaries), "Debian's postgresql is not installed")
    bin_dir = binaries[-1].parent
    root = Path(tempfile.mkdtemp(prefix="hpcdl-pg-", dir="/var/tmp"))
    root.chmod(0o755)
    shutil.chown(root, "postgres", "postgres")
    superuser = root / "superuser-password"
    superuser.write_text(secrets.token_hex(16))
    shutil.chown(superuser, "postgres", "postgres")
    superuser.chmod(0o600)
    data, port = root / "data", free_port()

    def as_postgres(*command):
        return subprocess.run(["runuser", "-u", "postgres", "--", *map(str, command)], capture_output=True, text=True, timeout=120, cwd=root)

    init = as_postgres(bin_dir / "initdb", "-D", data, "-A", "scram-sha-256", "--pwfile", superuser, "-U", "postgres")
    assert init.returncode == 0, init.stderr
    start = as_postgres(bin_dir / "pg_ctl", "-D", data, "-l", root / "postgres.log", "-w",
                        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    assert start.returncode == 0, start.stderr + (root / "postgres.log").read_text()
    password = secrets.token_hex(16)
    create = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1",
                             "-c", f"CREATE ROLE mlflow LOGIN PASSWORD '{password}'", "-c", "CREATE DATABASE mlflow OWNER mlflow"],
                            env=dict(os.environ, PGPASSWORD=superuser.read_text()), capture_output=True, text=True, timeout=60)
    assert create.returncode == 0, create.stderr
    pgpass = root / "pgpass"
    pgpass.write_text(f"127.0.0.1:{port}:mlflow:mlflow:{password}\n")
    pgpass.chmod(0o600)
    try:
        yield Postgres(f"postgresql+psycopg://mlflow@127.0.0.1:{port}/mlflow", pgpass, password)
    finally:
        as_postgres(bin_dir / "pg_ctl", "-D", data, "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class TrackingServer:
    uri: str
    port: int
    artifacts: Path
    state: Path
    admin: Credentials
    users: dict[str, Credentials]
    command: list[str]
    env: dict
    log: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        with self.log.open("a") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_http(f"http://127.0.0.1:{self.port}/health", timeout=180, process=self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self.process = None

    def command_lines(self) -> list[str]:
        """The command lines of the server and its workers, as `ps` shows them to every user."""
        import psutil

        if self.process is None:
            return []
        processes = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        return [" ".join(p.cmdline()) for p in processes]


@pytest.fixture(scope="session")
def tracking_server(postgres, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking-server")
    root.chmod(0o755)
    admin = Credentials("admin", secrets.token_hex(12), root / "home-admin")
    write_credentials(admin.home, admin.name, admin.password)
    admin_file = root / "admin-password"
    admin_file.write_text(admin.password)
    admin_file.chmod(0o600)
    port = free_port()
    artifacts = Path(tempfile.mkdtemp(prefix="hpcdl-mlartifacts-", dir="/var/tmp"))  # shared: the Slurm nodes see it
    command = [sys.executable, "-m", "hpcdl.tracking_server", "serve", "--state", str(root / "state"), "--db", postgres.uri,
               "--artifacts", str(artifacts), "--host", "0.0.0.0", "--port", str(port), "--workers", "2",
               "--admin-password-file", str(admin_file)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PGPASSFILE"] = str(postgres.pgpass)
    server = TrackingServer(f"http://{socket.gethostname()}:{port}", port, artifacts, root / "state", admin, {}, command, env, root / "server.log")
    started = time.monotonic()
    server.start()
    print(f"tracking server up in {time.monotonic() - started:.1f} s at {server.uri}")
    for name in ("alice", "bob"):
        user = Credentials(name, secrets.token_hex(12), root / f"home-{name}")
        write_credentials(user.home, name, user.password)
        add = subprocess.run([sys.executable, "-m", "hpcdl.tracking_server", "add-user", name, "--uri", server.uri],
                             input=user.password + "\n", env=admin.env(), capture_output=True, text=True, timeout=120)
        assert add.returncode == 0, add.stderr[-3000:]
        server.users[name] = user
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(artifacts, ignore_errors=True)
