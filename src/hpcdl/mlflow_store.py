"""Which MLflow store a stage logs to: the configured one, or, when that is a tracking server the job cannot reach,
an offline store of the job's own on the shared results folder, which hpcdl.mlflow_sync later copies into the
server without loss.

Compute nodes often cannot reach the login node's tracking server (or any network) while jobs run. `tracking_offline`
decides (config; only for http(s) URIs): `auto` checks the server when the stage starts and falls back with one
log line, `always` never tries, `never` fails instead. An offline store is one SQLite file per job
(results/mlflow-offline/<run name>.db, artifacts beside it): SQLite on a parallel file system locks badly when
several jobs share one file, so they never do. Wrong credentials are never a reason to go offline: they stop the
stage with a message naming the server and the user (never the password)."""

from __future__ import annotations

import configparser
import os
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

OFFLINE_MODES = ("auto", "always", "never")
PROBE_TIMEOUT_S = 10
# Tags of an offline run that continues a server run it could not reach (a resumed stage): the sync merges it there.
CONTINUES_RUN = "hpcdl.sync.target_run_id"
CONTINUES_STORE = "hpcdl.sync.target_uri"


@dataclass(frozen=True)
class Store:
    uri: str
    offline: bool = False
    artifact_location: str | None = None  # for stores that are files: where new experiments keep their artifacts


class CredentialsError(RuntimeError):
    """The tracking server refused this user's credentials."""


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def file_store(uri: str) -> Store:
    """A SQLite store keeps its artifacts next to it (<folder>/mlartifacts, or artifacts/ for offline stores)."""
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if db is None:
        return Store(uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    offline = db.parent.name == "mlflow-offline"
    artifacts = db.parent / ("artifacts" if offline else "mlartifacts")
    return Store(uri, offline, artifacts.resolve().as_uri())


def offline_store(offline_dir, job: str) -> Store:
    folder = Path(offline_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return file_store(f"sqlite:///{folder}/{job}.db")


def use_credentials_file() -> None:
    """Inside the image a stage's home is the workflow folder, not the user's, so MLflow would not find
    ~/.mlflow/credentials: the rules bind the user's file in read-only and name it in HPCDL_MLFLOW_CREDENTIALS. Its
    values go into this process's environment only (never printed, never on a command line); variables the user
    set win, as in MLflow."""
    path = os.environ.get("HPCDL_MLFLOW_CREDENTIALS")
    if not path or not Path(path).is_file():
        return
    parser = configparser.ConfigParser()
    parser.read(path)
    if "mlflow" in parser:
        for key in ("mlflow_tracking_username", "mlflow_tracking_password"):
            if parser["mlflow"].get(key) and not os.environ.get(key.upper()):
                os.environ[key.upper()] = parser["mlflow"][key]


def unreachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the server at `uri` cannot be reached (None if it answers its health check)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return None if response.status == 200 else f"health check answered HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return f"health check answered HTTP {error.code}"
    except (OSError, ValueError) as error:
        return str(getattr(error, "reason", error))


def check_credentials(uri: str) -> None:
    """One authenticated request, so that a wrong password stops the stage at once, before it writes anything."""
    from mlflow.utils.credentials import get_default_host_creds, read_mlflow_creds
    from mlflow.utils.rest_utils import http_request

    response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                            params={"max_results": 1}, max_retries=0, timeout=PROBE_TIMEOUT_S)
    if response.status_code in (401, 403):
        user = read_mlflow_creds().username
        raise CredentialsError(
            f"the MLflow server {uri} refused the credentials of user {user or '(none given)'} "
            f"(HTTP {response.status_code}): set them in ~/.mlflow/credentials (mode 0600) or in "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )


def choose_store(mlflow_cfg: dict, job: str) -> Store:
    """The store a job logs to (see the module's docstring); prints one line when it falls back to offline."""
    uri = mlflow_cfg["tracking_uri"]
    if not is_server(uri):
        return file_store(uri)
    use_credentials_file()
    mode = mlflow_cfg.get("offline", "auto")
    if mode == "always":
        return offline_store(mlflow_cfg["offline_dir"], job)
    reason = unreachable(uri)
    if reason is None:
        check_credentials(uri)
        return Store(uri)
    if mode == "never":
        raise RuntimeError(f"the MLflow server {uri} cannot be reached from {socket.gethostname()}: {reason} (tracking_offline: never)")
    store = offline_store(mlflow_cfg["offline_dir"], job)
    print(f"hpcdl: MLflow server {uri} cannot be reached from {socket.gethostname()} ({reason}); logging offline to "
          f"{store.uri}; the workflow syncs it into the server at its end, or run: python -m hpcdl.mlflow_sync "
          f"{mlflow_cfg['offline_dir']} {uri}", file=sys.stderr, flush=True)
    return store
