"""A group's MLflow tracking server on a login or service node: PostgreSQL behind it, artifacts proxied by the
server onto shared storage, MLflow's basic-auth app in front, users and grants through the auth API.

    python -m hpcdl.tracking_server serve --state DIR --db postgresql+psycopg://mlflow@dbhost/mlflow \\
        --artifacts /shared/mlflow-artifacts [--host 0.0.0.0] [--port 5000] [--allowed-host login1 ...]
    python -m hpcdl.tracking_server add-user NAME --uri http://login1:5000         # password read from stdin
    python -m hpcdl.tracking_server grant NAME EXPERIMENT READ|EDIT|MANAGE --uri http://login1:5000

Secrets never go on a command line (where `ps` shows them), into a log or into a committed file:
- the database password comes from libpq's own files: PGPASSFILE or ~/.pgpass (the URI names no password);
- the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD or from --admin-password-file (a 0600 file); MLflow
  >= 3.16 has no default admin password and creates the admin user from it on the first start;
- a user's password is read from stdin (or --password-file), the admin's own credentials for add-user/grant from
  MLflow's usual places (MLFLOW_TRACKING_USERNAME/PASSWORD or ~/.mlflow/credentials).
Why a command of our own rather than a bare `mlflow server`: the auth config file, the Flask secret shared by the
workers, `mlflow db upgrade` on an existing database and the allow-list of host names are easy to get wrong, and a
wrong allow-list only shows up as 403s from compute nodes."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import stat
import subprocess
import sys
from pathlib import Path

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


def host_names(extra: list[str]) -> list[str]:
    """The names and addresses this machine is reached by, and any alias the user gives."""
    names = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn(), *extra}
    try:
        names.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, family=socket.AF_INET))
    except OSError:
        pass
    return sorted(name for name in names if name)


def allowed_hosts(extra: list[str]) -> list[str]:
    """Host headers the server accepts. --allowed-hosts replaces MLflow's default list (localhost and private
    address ranges only), so jobs that reach the server as http://<login node>:<port> would get 403: every name of
    this machine, with any port."""
    names = host_names(extra)
    return [*names, *(f"{name}:*" for name in names), "[::1]", "[[]::1]:*"]


def allowed_origins(extra: list[str], port: int) -> list[str]:
    """Origins whose browser requests may change state. The UI's own POSTs carry its origin, and MLflow blocks every
    origin but localhost unless listed: a user browsing to http://<login node>:<port> would see "Request error"
    on every runs table."""
    return [f"{scheme}://{name}:{port}" for name in host_names(extra) for scheme in ("http", "https")]


def private_file(path: Path, text: str) -> None:
    """Write a file only its owner can read (created with mode 0600, never readable by others meanwhile)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(text)


def read_secret_file(path: Path, what: str) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SystemExit(f"{path}: {what} file is readable by others (mode {oct(mode)}); chmod 600 {path}")
    value = path.read_text().strip()
    if not value:
        raise SystemExit(f"{path}: {what} file is empty")
    return value


def serve(args) -> int:
    state = Path(args.state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    if "@" in args.db and ":" in args.db.split("@", 1)[0].split("//", 1)[-1]:
        raise SystemExit("--db: put no password in the URI (it would show in `ps`); use PGPASSFILE or ~/.pgpass")
    env = dict(os.environ)
    if args.admin_password_file:
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = read_secret_file(Path(args.admin_password_file), "admin password")
    if len(env.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")) < 12:
        raise SystemExit("the admin password must be set, at least 12 characters: MLFLOW_AUTH_ADMIN_PASSWORD or --admin-password-file")
    auth_config = state / "basic_auth.ini"
    private_file(auth_config, "\n".join([
        "[mlflow]",
        f"default_permission = {args.default_permission}",
        f"database_uri = {args.auth_db or args.db}",
        f"admin_username = {args.admin}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        # Every request's password is checked with a deliberately slow hash (PBKDF2); a stage logs hundreds of
        # requests, which then spend most of their time there (measured: README, Measured). A worker remembers a
        # checked password this long; a password changed or a user deleted through another worker may still work
        # for up to that many seconds on this one.
        f"auth_cache_ttl_seconds = {args.auth_cache_seconds}",
        "",
    ]))
    secret_key = state / "flask-secret"
    if not secret_key.exists():  # the same key for every worker and across restarts (sessions stay valid)
        private_file(secret_key, secrets.token_hex(32))
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(auth_config), MLFLOW_FLASK_SERVER_SECRET_KEY=secret_key.read_text().strip())
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    # An existing database is brought to this MLflow's schema; an empty one is created by the server itself.
    upgrade = subprocess.run([mlflow, "db", "upgrade", args.db], env=env, capture_output=True, text=True)
    if upgrade.returncode != 0 and "does not exist" not in upgrade.stderr:
        raise SystemExit(f"mlflow db upgrade failed:\n{upgrade.stderr[-2000:]}")
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    command = [mlflow, "server", "--app-name", "basic-auth", "--backend-store-uri", args.db, "--serve-artifacts",
               "--artifacts-destination", str(Path(args.artifacts).resolve()), "--host", args.host, "--port", str(args.port),
               "--workers", str(args.workers), "--allowed-hosts", ",".join(allowed_hosts(args.allowed_host)),
               "--cors-allowed-origins", ",".join(allowed_origins(args.allowed_host, args.port))]
    print(f"hpcdl: MLflow server for {args.db} on http://{args.host}:{args.port} (auth config {auth_config})", flush=True)
    os.execve(mlflow, command, env)


def app_client(uri: str):
    from mlflow.server import get_app_client

    return get_app_client("basic-auth", tracking_uri=uri)


def add_user(args) -> int:
    password = read_secret_file(Path(args.password_file), "password") if args.password_file else sys.stdin.readline().strip()
    if not password:
        raise SystemExit("no password given (stdin or --password-file)")
    app_client(args.uri).create_user(username=args.name, password=password)
    print(f"hpcdl: user {args.name} created on {args.uri}")
    return 0


def grant(args) -> int:
    import mlflow

    experiment = mlflow.MlflowClient(tracking_uri=args.uri).get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} on {args.uri}")
    app_client(args.uri).grant_user_permission(args.name, "experiment", experiment.experiment_id, args.permission)
    print(f"hpcdl: {args.name} may {args.permission} experiment {args.experiment} ({experiment.experiment_id})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve", help="start the server (replaces this process)")
    server.add_argument("--state", required=True, help="folder for the auth config and the Flask secret (mode 0700)")
    server.add_argument("--db", required=True, help="backend store, e.g. postgresql+psycopg://mlflow@dbhost:5432/mlflow (no password)")
    server.add_argument("--auth-db", help="store of users and permissions (default: the same database)")
    server.add_argument("--artifacts", required=True, help="artifact folder on shared storage; the server proxies every upload and download")
    server.add_argument("--host", default="0.0.0.0", help="address to listen on (default: every interface, for compute nodes)")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--workers", type=int, default=4)
    server.add_argument("--allowed-host", action="append", default=[], help="another name jobs or browsers use for this machine (repeatable)")
    server.add_argument("--admin", default="admin", help="admin user name")
    server.add_argument("--admin-password-file", help="file (mode 0600) with the admin password, else MLFLOW_AUTH_ADMIN_PASSWORD")
    server.add_argument("--auth-cache-seconds", type=int, default=60,
                        help="how long a worker trusts a checked password (0: check every request; default 60)")
    server.add_argument("--default-permission", default="NO_PERMISSIONS", choices=PERMISSIONS,
                        help="what every user may do with experiments they were not granted (default: nothing)")
    for name, function in (("add-user", add_user), ("grant", grant)):
        sub = commands.add_parser(name)
        sub.set_defaults(function=function)
        sub.add_argument("name", help="user name")
        if name == "grant":
            sub.add_argument("experiment")
            sub.add_argument("permission", choices=PERMISSIONS)
        else:
            sub.add_argument("--password-file", help="file (mode 0600) with the new user's password; default: read from stdin")
        sub.add_argument("--uri", required=True, help="the server, e.g. http://login1:5000 (admin credentials: MLflow's usual places)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return args.function(args)


if __name__ == "__main__":
    sys.exit(main())
