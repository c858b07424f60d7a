"""Every stage in the Apptainer image, with a real Apptainer (tests/apptainer/install-apptainer.sh), as the
unprivileged test user:

1. the record a run keeps of its image: record_image refuses an image that changed after its build; a stage that
   is told it runs in an image but does not refuses to log (fast, no container);
2. the image: built unprivileged by `snakemake build_images` (--fakeroot), labelled with the commit, its sha256
   beside it, read-only when run, and rebuilt only when its inputs change (the package: the thin image only);
3. the whole default pipeline in the image, locally (`mpirun ... apptainer exec`) and on the test Slurm cluster
   (`srun --mpi=pmix ... apptainer exec`, train and finetune across 2 nodes, each backend): every stage's MLflow
   run proves it ran inside the image (tags a stage writes only from inside it), names the image's path, sha256
   and the apptainer version; the local run meets the targets of the run on the host, the Slurm runs train short
   (SHORT_ON_TWO_NODES).
Root on Debian (skipped elsewhere, failed under CI=true).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import hpcdl
from conftest import DEFAULT_CONFIG as CONFIG
from conftest import REPO, assert_results_meet_the_targets
from container_fixtures import StageImage, file_sha256, image_label
from slurm_fixtures import chown_tree, mlflow_runs, profile_variant, run_snakemake

# The Slurm runs in the image train briefly: what they test is where and how each stage runs (a Slurm job each, srun
# around apptainer exec on 2 nodes, both backends), not what training reaches. The accuracy targets are asserted by
# the full-length runs: on the host (tests/test_workflow.py), on the host's Slurm (tests/test_slurm.py) and in the
# image locally (below). Full length, the two cost 129 s more of CI on a 2-core AMD EPYC (README, Measured).
SHORT_ON_TWO_NODES = {"train": {"nodes": 2, "epochs": 2}, "finetune": {"nodes": 2, "epochs_frozen": 1, "epochs_unfrozen": 1, "baseline": False}}

# The default pipeline's stages, and those of `snakemake all onnx` (the local run in the image exports too).
STAGES = ["fetch-pretrain", "fetch-finetune", "preprocess-pretrain", "preprocess-finetune", "train", "evaluate", "finetune"]
STAGES_WITH_ONNX = [*STAGES, "export_onnx-train", "export_onnx-finetune"]


# --- 1. the record of the image -------------------------------------------------------------------------------------


def test_record_image_refuses_an_image_that_changed_after_its_build(tmp_path):
    image = tmp_path / "hpcdl-cpu.sif"
    image.write_bytes(b"an image")
    digest = tmp_path / "hpcdl-cpu.sif.sha256"
    digest.write_text(f"{'0' * 64}  hpcdl-cpu.sif\n")
    out = tmp_path / "results" / "container.json"
    run = record_image("--image", str(image), "--digest", str(digest), "--out", str(out))
    assert run.returncode != 0
    assert str(image) in run.stderr and "0" * 64 in run.stderr and "changed after its build" in run.stderr, run.stderr
    assert not out.exists(), "no record of an image nobody can name"


def fake_image(folder: Path, content: bytes = b"an image") -> tuple[Path, Path, str]:
    """An image file and its .sha256 line, as containers/build-image.sh writes them (not a real image)."""
    import hashlib

    image = folder / "hpcdl-cpu.sif"
    image.write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    digest_file = folder / "hpcdl-cpu.sif.sha256"
    digest_file.write_text(f"{digest}  hpcdl-cpu.sif\n")
    return image, digest_file, digest


def record_image(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcdl.record_image", *args], capture_output=True, text=True, timeout=60)


def test_record_image_refuses_a_sandbox_not_unpacked_from_the_image(tmp_path):
    """With container_sandbox the stages run from the folder: its record must name the image it came from, and that
    must be the image the .sha256 names now."""
    image, digest_file, digest = fake_image(tmp_path)
    sandbox = tmp_path / "sandbox"
    (sandbox / ".singularity.d").mkdir(parents=True)
    out = tmp_path / "results" / "container.json"
    common = ["--image", str(image), "--digest", str(digest_file), "--sandbox", str(sandbox), "--out", str(out)]
    not_unpacked = record_image(*common)
    assert not_unpacked.returncode != 0 and str(sandbox) in not_unpacked.stderr and "sandbox.sha256" in not_unpacked.stderr, not_unpacked.stderr
    (tmp_path / "sandbox.sha256").write_text(f"{'1' * 64}  hpcdl-cpu.sif\n")  # unpacked from an earlier build
    stale = record_image(*common)
    assert stale.returncode != 0 and "1" * 64 in stale.stderr and digest in stale.stderr and "unpack the image again" in stale.stderr, stale.stderr
    assert not out.exists()


def test_unpack_image_refuses_an_image_that_changed_after_its_build(tmp_path):
    image, digest_file, digest = fake_image(tmp_path)
    image.write_bytes(b"another image")
    sandbox = tmp_path / "sandbox"
    run = subprocess.run([sys.executable, "-m", "hpcdl.unpack_image", "--image", str(image), "--digest", str(digest_file), "--sandbox", str(sandbox)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and digest in run.stderr and "changed after its build" in run.stderr, run.stderr
    assert not sandbox.exists() and not (tmp_path / "sandbox.sha256").exists()


def test_unpack_image_leaves_a_folder_it_did_not_unpack_alone(tmp_path):
    """container_sandbox naming a folder of the user's by mistake: refused by name, and nothing in it is touched
    (the rule's only output is the digest file beside it, so Snakemake does not delete the folder either)."""
    image, digest_file, _ = fake_image(tmp_path)
    folder = tmp_path / "my-results"
    folder.mkdir()
    (folder / "thesis.tex").write_text("three years of work")
    run = subprocess.run([sys.executable, "-m", "hpcdl.unpack_image", "--image", str(image), "--digest", str(digest_file), "--sandbox", str(folder)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and f"container_sandbox={folder} exists and is not an hpcdl image" in run.stderr, run.stderr
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"] and (folder / "thesis.tex").read_text() == "three years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpcdl-cpu.sif", "hpcdl-cpu.sif.sha256", "my-results"]


def test_a_stage_outside_its_recorded_image_refuses_to_log(tmp_path, monkeypatch):
    from hpcdl.tracking import container_tags

    record = tmp_path / "container.json"
    record.write_text(json.dumps({"image": "/images/hpcdl-cpu.sif", "sha256": "ab" * 32, "apptainer": "1.4.5"}))
    monkeypatch.delenv("APPTAINER_CONTAINER", raising=False)
    with pytest.raises(RuntimeError, match="not inside an Apptainer container") as error:
        container_tags(record)
    assert str(record) in str(error.value) and "/images/hpcdl-cpu.sif" in str(error.value)
    assert container_tags(None) == {}, "stages on the host carry no image tags"


def rendered(profile: str, **variables) -> dict:
    """A profile rendered as Snakemake renders it (YTE), with some `__variables__` changed."""
    import yte

    source = (REPO / "profiles" / profile / "profile.yaml").read_text()
    for key, value in variables.items():
        source, count = re.subn(rf"^(  {key}:) *[^#\n]*", rf"\1 {json.dumps(value)} ", source, count=1, flags=re.M)
        assert count == 1, key
    return yte.process_yaml(source, require_use_yte=True)


def test_profiles_turn_containers_on_contained_and_gpus_add_nv():
    slurm = rendered("slurm")
    assert slurm["software-deployment-method"] == "apptainer" and slurm["apptainer-args"] == "--contain"
    assert rendered("slurm", gpus=4)["apptainer-args"] == "--contain --nv"
    assert rendered("slurm", apptainer_binds=["/scratch/me"])["apptainer-args"] == "--contain --bind /scratch/me"
    assert "software-deployment-method" not in rendered("slurm", apptainer=False)
    local = rendered("apptainer")
    assert local["software-deployment-method"] == "apptainer" and local["apptainer-args"] == "--contain"
    assert rendered("apptainer", gpu=True)["apptainer-args"] == "--contain --nv"
    # the CI twin of profiles/slurm runs the Slurm tests on the host; test_pipeline_in_the_image_on_slurm turns it on
    assert "software-deployment-method" not in rendered("slurm-test")
    assert rendered("slurm-test", apptainer=True)["apptainer-args"] == "--contain"


# --- 2. the image ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_image_is_labelled_digested_and_read_only(stage_image: StageImage, slurm_user):
    digest_file = stage_image.path.with_name(stage_image.path.name + ".sha256")
    assert digest_file.read_text().split() == [stage_image.sha256, stage_image.path.name]
    assert image_label(stage_image, slurm_user, "org.opencontainers.image.revision") == stage_image.git_commit
    assert image_label(stage_image, slurm_user, "org.opencontainers.image.version") == hpcdl.__version__
    assert image_label(stage_image, slurm_user, "hpcdl.flavour") == "cpu"
    # the image's own %test (imports, Horovod's build, the package's stage CLIs), run again from the finished file
    check = slurm_user.run(["apptainer", "test", str(stage_image.path)], timeout=600)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    write = slurm_user.run(["apptainer", "exec", "--contain", str(stage_image.path), "touch", "/opt/hpcdl/x"], timeout=120)
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr


def jobs_to_run(workdir: Path, user, *targets: str) -> list[str]:
    dry = run_snakemake(user, workdir, *targets, "--dry-run", timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    return sorted(set(re.findall(r"^(?:local)?rule (build_\w+):$", dry.stdout, re.M)) - {"build_images"})


@pytest.mark.slow
def test_images_are_rebuilt_only_when_their_inputs_change(stage_image: StageImage, slurm_user):
    """(Edits, not touches: Snakemake skips an input that is newer but has the checksum it recorded.)"""
    workdir = stage_image.path.parents[1]
    assert jobs_to_run(workdir, slurm_user, "build_images") == []
    with (workdir / "src" / "hpcdl" / "evaluate.py").open("a") as source:
        source.write("# an edit of the package\n")
    assert jobs_to_run(workdir, slurm_user, "build_images") == ["build_image"], "a package edit rebuilds only the thin image"
    with (workdir / "requirements.lock").open("a") as lock:
        lock.write("# an edit of the pins\n")
    assert jobs_to_run(workdir, slurm_user, "build_images") == ["build_base_image", "build_image"]


# --- 3. the pipeline in the image -----------------------------------------------------------------------------------


def assert_ran_on_both_nodes(run: dict, cluster) -> None:
    """A train or finetune run that finished with its configured ranks, one on each node of the test cluster."""
    tags = run["tags"]
    assert run["status"] == "FINISHED", (run["name"], run["status"])
    assert tags["world_size"] == str(CONFIG[run["name"]]["ranks"]) and tags["nodes"] == "2" and tags["ranks_per_node"] == "1", tags
    assert tags["slurm.nodelist"] == "n[1-2]" and sorted(tags["hosts"].split(",")) == list(cluster.nodes), tags


def assert_ran_in_the_image(runs: list[dict], image: StageImage, stages: list[str] = STAGES) -> list[dict]:
    """Every stage's run carries tags that a stage writes only after checking, inside the container, that it runs in
    the recorded image (APPTAINER_CONTAINER and /.singularity.d), and the commit it read from the image's build
    info (a file only the image has)."""
    parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED", [(r["name"], r["status"]) for r in parents]
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parents[0]["id"]]
    assert sorted(r["name"] for r in children) == sorted(stages)
    for run in children:
        tags = run["tags"]
        assert run["status"] == "FINISHED", run["name"]
        assert tags.get("hpcdl.container") == "apptainer", (run["name"], tags)
        assert tags["hpcdl.image.path"] == str(image.path.resolve()), (run["name"], tags["hpcdl.image.path"])
        assert tags["hpcdl.image.sha256"] == image.sha256, run["name"]
        assert tags["apptainer.version"] == image.apptainer_version, run["name"]
        assert tags["hpcdl.image.git_commit"] == image.git_commit, run["name"]
    return children


@pytest.mark.slow
def test_pipeline_in_the_image_locally(stage_image: StageImage, slurm_user, slurm_workdir):
    """`snakemake --profile profiles/apptainer`: plain rules through `container:`, train and finetune as host
    mpirun starting 2 ranks of `apptainer exec`."""
    workdir = slurm_workdir("apptainer-local")
    # a checkout, as users have: its commit must reach the stages in the image, which have no git
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qm", "workflow"]):
        slurm_user.run(command, cwd=workdir, check=True)
    commit = slurm_user.run(["git", "rev-parse", "HEAD"], cwd=workdir, check=True).stdout.strip()
    started = time.monotonic()
    run = run_snakemake(slurm_user, workdir, "--profile", "profiles/apptainer", "all", "onnx", "--config", f"container={stage_image.path}", timeout=1200)
    elapsed = time.monotonic() - started
    log = run.stdout + run.stderr
    (workdir / "snakemake.log").write_text(log)
    assert run.returncode == 0, log[-8000:]
    print(f"pipeline in the image, local: {elapsed:.1f} s wall")
    assert "shared memory initialization" not in log, "ranks on one node share memory through $TMPDIR"
    assert re.search(r"mpirun .*-n 2 \S+/rank-in-image\.sh \S+hpcdl-cpu\.sif --home \S+ --contain -- python -m hpcdl\.train", log), "host mpirun around apptainer exec"
    children = assert_ran_in_the_image(mlflow_runs(slurm_user, workdir / "results"), stage_image, STAGES_WITH_ONNX)
    assert {r["tags"]["git.commit"] for r in children} == {commit}, "the checkout's commit, handed in from the host"
    train = next(r for r in children if r["name"] == "train")
    assert train["tags"]["world_size"] == str(CONFIG["train"]["ranks"])
    assert_results_meet_the_targets(workdir / "results")


@pytest.mark.slow
def test_pipeline_in_the_image_on_slurm(stage_image: StageImage, slurm_cluster, slurm_user, slurm_workdir):
    """profiles/slurm-test with apptainer on (as profiles/slurm): every non-local stage a Slurm job in the image;
    train and finetune one job each on 2 nodes, whose ranks `srun --mpi=pmix` starts as `apptainer exec`, one per
    node, each binding its own node's /tmp (workflow/scripts/rank-in-image.sh runs on the rank's node)."""
    workdir = slurm_workdir("apptainer-slurm")
    profile = profile_variant(workdir, "slurm-apptainer", slurm_user, apptainer=True)
    (workdir / "two-nodes.yaml").write_text(yaml.safe_dump(SHORT_ON_TWO_NODES))
    chown_tree(workdir, slurm_user)
    started = time.monotonic()
    run = run_snakemake(slurm_user, workdir, "--profile", str(profile.relative_to(workdir)), "--verbose", "--configfile", "config/config.yaml", "two-nodes.yaml",
                        "--config", f"container={stage_image.path}", timeout=1500)
    elapsed = time.monotonic() - started
    log = run.stdout + run.stderr
    (workdir / "snakemake.log").write_text(log)
    assert run.returncode == 0, log[-8000:]
    print(f"pipeline in the image, Slurm: {elapsed:.1f} s wall")
    children = assert_ran_in_the_image(mlflow_runs(slurm_user, workdir / "results"), stage_image)
    for run_ in children:
        if not run_["name"].startswith("fetch"):  # fetch is a localrule: on the submitting host, in the image
            assert run_["tags"].get("slurm.job_id") and run_["tags"].get("slurm.partition") == "debug", (run_["name"], run_["tags"])
    for stage in ("train", "finetune"):
        assert_ran_on_both_nodes(next(r for r in children if r["name"] == stage), slurm_cluster)
        logs = list((workdir / ".snakemake" / "slurm_logs" / f"rule_{stage}").glob("*.log"))
        assert len(logs) == 1
        log = logs[0].read_text()
        assert re.search(r"srun --mpi=pmix -n 2 -N 2 --ntasks-per-node=1 --cpus-per-task=\d+ --kill-on-bad-exit=1 \S+/rank-in-image\.sh ", log), "host srun around apptainer exec"
    slurm_cluster.assert_nothing_of_rank_0_in_node_local_folders()


@pytest.mark.slow
def test_torch_backend_across_two_nodes_in_the_image(stage_image: StageImage, slurm_cluster, slurm_user, slurm_workdir):
    """The other backend in the image across nodes: torch.distributed's rendezvous (rank 0's host name, resolved on
    every node) and gloo between containers on different nodes. Starts from the datasets and image record of the
    Slurm pipeline above when it ran (same image, same data settings), so only train and finetune run."""
    workdir = slurm_workdir("apptainer-slurm-torch")
    earlier = workdir.parent / "apptainer-slurm" / "results"
    for item in ("raw", "data", "container.json"):
        source = earlier / item
        if source.is_dir():
            shutil.copytree(source, workdir / "results" / item)
        elif source.exists():
            shutil.copy2(source, workdir / "results" / item)
    profile = profile_variant(workdir, "slurm-apptainer", slurm_user, apptainer=True)
    (workdir / "torch.yaml").write_text(yaml.safe_dump({**SHORT_ON_TWO_NODES, "train": {**SHORT_ON_TWO_NODES["train"], "backend": "torch"}}))
    chown_tree(workdir, slurm_user)
    run = run_snakemake(slurm_user, workdir, "--profile", str(profile.relative_to(workdir)), "--configfile", "config/config.yaml", "torch.yaml",
                        "--config", f"container={stage_image.path}", "--", "results/finetune/metrics.json", timeout=1500)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-8000:]
    assert not re.search(r"^rule (fetch|preprocess):", log, re.M), "only train and finetune ran"
    runs = mlflow_runs(slurm_user, workdir / "results")
    for stage in ("train", "finetune"):
        run_ = next(r for r in runs if r["name"] == stage)
        assert run_["tags"]["backend"] == "torch" and run_["tags"]["hpcdl.image.sha256"] == stage_image.sha256, run_["tags"]
        assert_ran_on_both_nodes(run_, slurm_cluster)
    slurm_cluster.assert_nothing_of_rank_0_in_node_local_folders()


@pytest.mark.slow
def test_stages_in_the_image_log_to_the_tracking_server(stage_image: StageImage, tracking_server, slurm_user, slurm_workdir, monkeypatch):
    """tracking_uri: http://... with profiles/apptainer: inside the image a stage's home is the workflow folder, so the
    user's ~/.mlflow/credentials is bound in read-only; the runs reach the server, tagged with the image."""
    from mlflow.tracking import MlflowClient
    from tracking_fixtures import write_credentials

    alice = tracking_server.users["alice"]
    write_credentials(slurm_user.home, alice.name, alice.password, owner=(slurm_user.uid, slurm_user.gid))
    workdir = slurm_workdir("apptainer-server")
    (workdir / "short.yaml").write_text("train:\n  epochs: 1\n")
    chown_tree(workdir, slurm_user)
    run = run_snakemake(slurm_user, workdir, "--profile", "profiles/apptainer", "--configfile", "config/config.yaml", "short.yaml",
                        "--config", f"container={stage_image.path}", f"tracking_uri={tracking_server.uri}", "experiment=image-study",
                        "--", "results/train/model.pt", timeout=1200)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert alice.password not in output
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", alice.name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", alice.password)
    client = MlflowClient(tracking_uri=tracking_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("image-study").experiment_id])
    stages = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert {"fetch-pretrain", "preprocess-pretrain", "train"} <= set(stages), sorted(stages)
    for stage in stages.values():
        assert stage.info.status == "FINISHED" and stage.data.tags["hpcdl.image.sha256"] == stage_image.sha256, stage.info.run_name


@pytest.mark.slow
def test_stages_run_from_the_image_unpacked_into_a_sandbox(stage_image: StageImage, slurm_user, slurm_workdir):
    """container_sandbox: the image is unpacked once (unpack_image), the stages run from the folder (plain rules
    through Snakemake's `container:`, the ranks through rank-in-image.sh), their runs name the folder and the digest
    of the image it came from; the next invocation has nothing to do; a changed image replaces the folder. An
    unpack that fails leaves no folder, and a folder of the user's is never replaced."""
    workdir = slurm_workdir("apptainer-sandbox")
    images = workdir / "images"
    images.mkdir()
    image = images / stage_image.path.name  # a copy of its own, whose time stamp this test may change
    shutil.copy2(stage_image.path, image)
    shutil.copy2(stage_image.path.with_name(stage_image.path.name + ".sha256"), images)
    sandbox = images / "hpcdl-cpu"
    (workdir / "short.yaml").write_text("train:\n  epochs: 1\n")
    chown_tree(workdir, slurm_user)

    def args(image: Path, folder: Path, *extra: str, target: str = "results/train/model.pt") -> list[str]:
        return ["--profile", "profiles/apptainer", "--configfile", "config/config.yaml", "short.yaml",
                "--config", f"container={image}", f"container_sandbox={folder}", *extra, "--", target]

    try:
        run = run_snakemake(slurm_user, workdir, *args(image, sandbox), timeout=1200)
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-8000:]
        assert re.search(rf"rank-in-image\.sh {re.escape(str(sandbox))} --home ", log), "the ranks run from the folder"
        assert (sandbox / ".singularity.d").is_dir()
        assert (images / "hpcdl-cpu.sha256").read_text().split() == [stage_image.sha256, image.name]
        runs = [r for r in mlflow_runs(slurm_user, workdir / "results") if "mlflow.parentRunId" in r["tags"]]
        assert sorted(r["name"] for r in runs) == ["fetch-pretrain", "preprocess-pretrain", "train"]
        for stage in runs:
            tags = stage["tags"]
            assert tags["hpcdl.image.path"] == str(sandbox), (stage["name"], tags)
            assert tags["hpcdl.image.unpacked_from"] == str(image.resolve()) and tags["hpcdl.image.sha256"] == stage_image.sha256, tags
            assert tags["hpcdl.image.git_commit"] == stage_image.git_commit, "read from inside the unpacked image"
        dry = run_snakemake(slurm_user, workdir, *args(image, sandbox, "--dry-run"), timeout=300)
        assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, "unpacked once: " + dry.stdout[-3000:]

        # a rebuilt image (here: a newer time stamp) is unpacked again, replacing the folder once the new one is whole
        (sandbox / "left-by-the-first-unpack").write_text("")
        os.utime(image)
        again = run_snakemake(slurm_user, workdir, *args(image, sandbox, target="results/container.json"), timeout=600)
        assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
        assert (sandbox / ".singularity.d").is_dir() and not (sandbox / "left-by-the-first-unpack").exists()
        assert sorted(p.name for p in images.iterdir()) == ["hpcdl-cpu", "hpcdl-cpu.sha256", image.name, image.name + ".sha256"]

        # a folder of the user's named by mistake: refused, nothing in it touched
        mine = workdir / "my-results"
        mine.mkdir()
        (mine / "thesis.tex").write_text("three years of work")
        chown_tree(mine, slurm_user)
        refused = run_snakemake(slurm_user, workdir, *args(image, mine, target="results/container.json"), timeout=300)
        assert refused.returncode != 0
        assert "exists and is not an hpcdl image" in (workdir / "results" / "logs" / "unpack_image.log").read_text()
        assert [p.name for p in mine.iterdir()] == ["thesis.tex"]

        # a corrupt image with a matching digest: apptainer cannot unpack it, and no folder is left to run from
        broken = images / "broken.sif"
        broken.write_bytes(b"not a SIF image\n" * 1000)
        (images / "broken.sif.sha256").write_text(f"{file_sha256(broken)}  broken.sif\n")
        chown_tree(images, slurm_user)
        failed = run_snakemake(slurm_user, workdir, *args(broken, images / "broken"), timeout=300)
        assert failed.returncode != 0
        assert "build --sandbox" in (workdir / "results" / "logs" / "unpack_image.log").read_text()
        assert sorted(p.name for p in images.iterdir()) == ["broken.sif", "broken.sif.sha256", "hpcdl-cpu", "hpcdl-cpu.sha256", image.name, image.name + ".sha256"]
    finally:
        slurm_user.run(["rm", "-rf", str(sandbox)], timeout=300)  # 6.7 GB
        image.unlink(missing_ok=True)  # 3.3 GB
