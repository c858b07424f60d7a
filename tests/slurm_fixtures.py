"""Fixtures of the Slurm tests: a real multi-node Slurm cluster on this machine (tests/slurm/cluster-up.sh), an
unprivileged user who submits to it, and copies of the workflow that user owns.

    machine         session: the machine-wide changes the tests make, each undone at the end of the session
    slurm_cluster   session: the cluster, started from nothing (nodes n1, n2, each with its own host name and
                    node-local /tmp) and stopped at the end
    slurm_user      session: `hpcdl-ci` (created here when missing, and then deleted at the end), able to run this
                    checkout's venv; .run()/.popen() run commands as that user
    slurm_workdir   factory: a fresh copy of Snakefile, workflow/, config/, profiles/ owned by the user
    run_snakemake   helper: `snakemake <args>` as the user in a work dir (the repository's venv)
    profile_variant helper: a copy of profiles/slurm-test with some `__variables__` changed (gpus, train_runtime, ...)

Root on Debian only (the cluster script installs packages and starts daemons). Elsewhere the tests skip with the
reason; with CI=true they fail instead (require_or_fail). HPCDL_SLURM_DIR moves the cluster's state and logs
(default /var/tmp/hpcdl-slurm), HPCDL_SLURM_WORK the users' work dirs (default /var/tmp/hpcdl-slurm-work, emptied
at the start of each session and kept afterwards for inspection). Neither may lie under /tmp: every node has a
/tmp of its own, and work dirs play the cluster's shared file system.
"""

from __future__ import annotations

import os
import json
import pwd
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, require_or_fail

SLURM_DIR = Path(os.environ.get("HPCDL_SLURM_DIR", "/var/tmp/hpcdl-slurm"))
WORK_ROOT = Path(os.environ.get("HPCDL_SLURM_WORK", "/var/tmp/hpcdl-slurm-work"))
SLURM_CONF = SLURM_DIR / "etc" / "slurm.conf"
USER = os.environ.get("HPCDL_SLURM_USER", "hpcdl-ci")
NODES = int(os.environ.get("HPCDL_SLURM_NODES", "2"))
PARTITION = "debug"
SCRIPTS = REPO / "tests" / "slurm"
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin, whose python links to the base interpreter
SNAKEMAKE = VENV_BIN / "snakemake"
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "profiles")
EXTRA_PATH: list[str] = []  # folders put first on the test user's PATH (e.g. Apptainer's, by container_fixtures)


def _require_root_debian() -> None:
    require_or_fail(os.geteuid() == 0, "the Slurm tests start a real Slurm cluster: run them as root (CI does)")
    require_or_fail(Path("/etc/debian_version").exists(), "the Slurm tests need Debian (apt-get slurm-wlm munge)")
    require_or_fail(shutil.which("runuser") is not None, "the Slurm tests need runuser (util-linux)")
    for path in (SLURM_DIR, WORK_ROOT):
        if Path("/tmp") in [path, *path.parents]:
            pytest.fail(f"{path} lies under /tmp, which is private to each node of the test cluster")


class MachineChanges:
    """Machine-wide changes the tests make (a user, permissions, lines in /etc files), each recorded with its undo
    and undone in reverse order at the end of the session, so that the machine ends as it began (.ci/run checks)."""

    def __init__(self):
        self._undo: list[tuple[str, object]] = []

    def made(self, what: str, undo) -> None:
        self._undo.append((what, undo))

    def restore(self) -> None:
        for what, undo in reversed(self._undo):
            try:
                undo()
            except Exception as error:  # keep undoing the rest; say what could not be undone
                print(f"could not undo {what}: {error}", file=sys.stderr)
        self._undo.clear()

    def chmod(self, path: Path, mode: int) -> None:
        """chmod, remembering the old mode."""
        old = stat.S_IMODE(path.stat().st_mode)
        if old != mode:
            os.chmod(path, mode)
            self.made(f"chmod {oct(mode)} {path}", lambda: os.chmod(path, old))

    def append_line(self, path: Path, line: str) -> None:
        """Append a line to a text file (created if missing), removing exactly that line again at the end."""
        existed = path.exists()
        text = path.read_text() if existed else ""
        if line in text.splitlines():
            return
        with path.open("a") as f:
            f.write(("" if not text or text.endswith("\n") else "\n") + line + "\n")

        def undo():
            lines = path.read_text().splitlines(keepends=True)
            lines.remove(line + "\n")
            if lines or existed:
                path.write_text("".join(lines))
            else:
                path.unlink()

        self.made(f"line {line!r} in {path}", undo)


@pytest.fixture(scope="session")
def machine():
    changes = MachineChanges()
    yield changes
    changes.restore()


@dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path
    nodes: tuple[str, ...]
    partition: str
    conf: Path
    up_seconds: float  # how long cluster-up.sh took in this session

    def node_tmp(self, node: str) -> Path:
        """The folder that is /tmp on `node`."""
        return self.state_dir / "nodes" / node / "tmp"

    def assert_nothing_of_rank_0_in_node_local_folders(self) -> None:
        """Models, checkpoints, metrics, MLflow's store and plots go to the shared results folder; a node's /tmp
        holds only what MPI and PMIx keep there while a job runs."""
        for node in self.nodes:
            leftovers = [p for p in self.node_tmp(node).rglob("*") if p.suffix in {".pt", ".json", ".db", ".npy", ".png", ".pkl"}]
            assert not leftovers, (node, leftovers[:10])


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The test cluster, started from nothing by this session and stopped at its end."""
    _require_root_debian()
    started = time.monotonic()
    env = dict(os.environ, HPCDL_SLURM_NODES=str(NODES))
    up = subprocess.run(["bash", str(SCRIPTS / "cluster-up.sh"), str(SLURM_DIR)], capture_output=True, text=True, timeout=900, env=env)
    elapsed = time.monotonic() - started
    if up.returncode != 0:
        pytest.fail(f"tests/slurm/cluster-up.sh failed ({up.returncode}):\n{up.stdout[-3000:]}\n{up.stderr[-8000:]}")
    print(f"slurm cluster-up: {elapsed:.1f} s, {NODES} nodes")
    os.environ["SLURM_CONF"] = str(SLURM_CONF)  # this process's sinfo/squeue/scancel
    try:
        yield SlurmCluster(SLURM_DIR, tuple(f"n{i}" for i in range(1, NODES + 1)), PARTITION, SLURM_CONF, elapsed)
    finally:
        down = subprocess.run(["bash", str(SCRIPTS / "cluster-down.sh"), str(SLURM_DIR)], capture_output=True, text=True, timeout=180)
        if down.returncode != 0:
            print(f"tests/slurm/cluster-down.sh failed ({down.returncode}):\n{down.stdout}\n{down.stderr}", file=sys.stderr)
        os.environ.pop("SLURM_CONF", None)


def _make_traversable(path: Path, machine: MachineChanges) -> list[str]:
    """Give others search (x) permission on every directory above `path` and read permission on the path itself,
    where missing (the venv's interpreter may live under /root, pyenv); undone at the end of the session."""
    changed = []
    path = Path(path)
    for directory in reversed([p for p in path.parents]):
        mode = stat.S_IMODE(directory.stat().st_mode)
        if not mode & stat.S_IXOTH:
            machine.chmod(directory, mode | stat.S_IXOTH)
            changed.append(f"o+x {directory}")
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        wanted = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() or mode & stat.S_IXUSR else 0)
        if mode & wanted != wanted:
            machine.chmod(path, mode | wanted)
            changed.append(f"o+r{'x' if wanted & stat.S_IXOTH else ''} {path}")
    return changed


@dataclass(frozen=True)
class SlurmUser:
    """The unprivileged user that submits the tests' jobs (cluster-up.sh creates it)."""

    name: str
    home: Path
    uid: int
    gid: int

    def env(self, **extra) -> dict:
        """A clean login-like environment: no root's OMPI_ALLOW_RUN_AS_ROOT, no stray SLURM_*/SBATCH_* settings."""
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "SHELL": "/bin/bash",
            "PATH": ":".join([*EXTRA_PATH, str(VENV_BIN), "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"]),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONUNBUFFERED": "1",
            "TMPDIR": "/tmp",
            "SLURM_CONF": str(SLURM_CONF),
        }
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def command(self, args: list[str], env: dict | None = None) -> list[str]:
        environment = self.env(**(env or {}))
        return ["runuser", "-u", self.name, "--", "env", "-i", *(f"{k}={v}" for k, v in environment.items()), *map(str, args)]

    def run(self, args: list[str], *, cwd: Path | str | None = None, env: dict | None = None, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(args, env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} as {self.name} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def popen(self, args: list[str], *, cwd: Path | str | None = None, env: dict | None = None, **popen) -> subprocess.Popen:
        return subprocess.Popen(self.command(args, env), cwd=cwd, text=True, **popen)


@pytest.fixture(scope="session")
def slurm_user(slurm_cluster, machine) -> SlurmUser:
    """`hpcdl-ci`, created when missing (and deleted at the end), checked to be able to import this checkout's packages
    from the venv (as on a cluster, where the venv lies on a shared file system readable by the user)."""
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "--user-group", USER], check=True, capture_output=True, text=True)
        machine.made(f"user {USER}", lambda: subprocess.run(["userdel", "--remove", USER], capture_output=True, check=True))
        entry = pwd.getpwnam(USER)
    user = SlurmUser(USER, Path(entry.pw_dir), entry.pw_uid, entry.pw_gid)
    changed = []
    for path in (Path(sys.executable).resolve(), VENV_BIN, REPO / "src", REPO / "src" / "hpcdl"):
        changed += _make_traversable(path, machine)
    if changed:
        print(f"made the venv reachable for {USER}: {', '.join(changed)}")
    probe = user.run([sys.executable, "-c", "import hpcdl, snakemake, torch, mpi4py, mlflow, snakemake_executor_plugin_slurm"], cwd="/", timeout=300)
    if probe.returncode != 0:
        pytest.fail(f"{USER} cannot use the venv {VENV_BIN.parent} (check permissions):\n{probe.stderr[-3000:]}")
    return user


@pytest.fixture(scope="session")
def _work_root(slurm_user, machine) -> Path:
    if WORK_ROOT.exists():
        shutil.rmtree(WORK_ROOT)
    WORK_ROOT.mkdir(parents=True)
    WORK_ROOT.chmod(0o755)
    _make_traversable(WORK_ROOT, machine)
    return WORK_ROOT


@pytest.fixture(scope="session")
def slurm_workdir(_work_root, slurm_user):
    """Factory: slurm_workdir("name") -> a fresh copy of the workflow (Snakefile, workflow/, config/, profiles/)
    owned by the Slurm user, so that its .snakemake/ and results/ are writable. The venv stays where it is."""

    def make(name: str) -> Path:
        target = _work_root / name
        if target.exists():
            raise ValueError(f"work dir {target} exists already: use another name")
        target.mkdir()
        for item in WORKFLOW_FILES:
            source = REPO / item
            if source.is_dir():
                shutil.copytree(source, target / item, ignore=shutil.ignore_patterns("__pycache__", ".snakemake"))
            else:
                shutil.copy2(source, target / item)
        chown_tree(target, slurm_user)
        return target

    return make


def chown_tree(root: Path, user: SlurmUser) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, user.uid, user.gid, follow_symlinks=False)


def run_snakemake(user: SlurmUser, workdir: Path, *args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """`snakemake <args>` as the Slurm user in `workdir` (the repository's venv; stdout and stderr captured)."""
    return user.run([SNAKEMAKE, *args], cwd=workdir, env=env, timeout=timeout)


MLFLOW_DUMP = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
experiment = client.get_experiment_by_name("hpcdl-default")
runs = client.search_runs([experiment.experiment_id], max_results=1000)
print(json.dumps([{"id": r.info.run_id, "name": r.info.run_name, "status": r.info.status, "tags": r.data.tags,
                   "params": r.data.params} for r in runs]))
"""


def mlflow_runs(user, results: Path) -> list[dict]:
    """The MLflow runs of the experiment, read as the user who owns the store (no root-owned journal files)."""
    dump = user.run([sys.executable, "-c", MLFLOW_DUMP, f"sqlite:///{results}/mlflow.db"], cwd=results, timeout=300, check=True)
    return json.loads(dump.stdout.strip().splitlines()[-1])


def profile_variant(workdir: Path, name: str, user: SlurmUser | None = None, **variables) -> Path:
    """A copy of `workdir`/profiles/slurm-test as `workdir`/profiles/<name> with some of its `__variables__` set,
    e.g. profile_variant(w, "gpu", gpus=2) or profile_variant(w, "short", train_runtime=2, walltime_signal_s=60).
    (`--set-resources` on the command line would replace the profile's whole set-resources, not merge with it.)"""
    source = (workdir / "profiles" / "slurm-test" / "profile.yaml").read_text()
    for key, value in variables.items():
        rendered = "null" if value is None else repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
        source, count = re.subn(rf"^(  {re.escape(key)}:) *[^#\n]*?( *#.*)?$", lambda m, rendered=rendered: f"{m.group(1)} {rendered}{m.group(2) or ''}", source, count=1, flags=re.M)
        if count != 1:
            raise KeyError(f"{key} is not a __variables__ entry of profiles/slurm-test/profile.yaml")
    target = workdir / "profiles" / name
    target.mkdir(parents=True, exist_ok=False)
    (target / "profile.yaml").write_text(source)
    if user is not None:
        chown_tree(target, user)
    return target


def squeue(*args: str) -> str:
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=30).stdout
