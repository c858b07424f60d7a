# Apptainer images of the stages (containers/*.def), built unprivileged on the host that runs Snakemake:
#
#   snakemake build_images          # the image `container` names (default containers/hpcdl-cpu.sif) + .sha256
#
# Two images, so that editing the package does not rebuild torch and Horovod: hpcdl-base-<flavour>.sif (OS, MPI,
# Python packages, Horovod; rebuilt when its def, requirements-runtime.txt, requirements.lock or the Horovod
# build script/patch change) and hpcdl-<flavour>.sif (base + this package; rebuilt when the package changes).
# <flavour> is cpu or gpu (CUDA toolkit + Horovod with NCCL; run with --nv). A run with `--sdm apptainer` builds a
# missing or outdated image first, as any other input. These rules run on the host by nature (they make the image
# and check it): `run:` + shell(), like the MPI rules, so that no container wraps them.
localrules:
    build_images,
    build_base_image,
    build_image,
    unpack_image,
    record_image,


wildcard_constraints:
    flavour="cpu|gpu",


PACKAGE_FILES = sorted(
    path for path in glob.glob("src/hpcdl/**/*", recursive=True) if os.path.isfile(path) and "__pycache__" not in path
)


rule build_images:
    """The stage image named by `container`, with its sha256 beside it (the image cache of CI reuses both)."""
    input:
        IMAGE,
        f"{IMAGE}.sha256",


rule build_base_image:
    """Debian 12 + Open MPI + Python 3.11 + pinned runtime packages + Horovod (containers/hpcdl-base.def)."""
    input:
        definition="containers/hpcdl-base.def",
        requirements="requirements-runtime.txt",
        lock="requirements.lock",
        horovod=["scripts/build-horovod.sh", "scripts/horovod-0.28.1-torch2.14.patch"],
    output:
        image="containers/hpcdl-base-{flavour}.sif",
        digest="containers/hpcdl-base-{flavour}.sif.sha256",
    log:
        "containers/logs/hpcdl-base-{flavour}.log",
    run:
        shell(
            "containers/build-image.sh {input.definition} {output.image} FLAVOUR={wildcards.flavour}"
            " -- {input.requirements} {input.lock} {input.horovod} > {log} 2>&1"
        )


rule build_image:
    """The stage image: base + this package, labelled with the version and the commit it was built from."""
    input:
        definition="containers/hpcdl.def",
        base="containers/hpcdl-base-{flavour}.sif",
        base_digest="containers/hpcdl-base-{flavour}.sif.sha256",
        package=["pyproject.toml", *PACKAGE_FILES],
    output:
        image="containers/hpcdl-{flavour}.sif",
        digest="containers/hpcdl-{flavour}.sif.sha256",
    log:
        "containers/logs/hpcdl-{flavour}.log",
    params:
        version=lambda wildcards: hpcdl.__version__,
    # The commit is read when the job runs, not as a param: a param would rebuild the image (and re-run every
    # stage) on each commit, even one that changes no file of the package.
    run:
        shell(
            "containers/build-image.sh {input.definition} {output.image} BASE={input.base} VERSION={params.version}"
            ' GIT_COMMIT="$(git describe --always --dirty --abbrev=40 2>/dev/null || echo unknown)"'
            " -- {input.base_digest} {input.package} > {log} 2>&1"
        )


if SANDBOX:

    rule unpack_image:
        """With `container_sandbox`: the checked image unpacked into that folder (apptainer build --sandbox), which
        the stages run from; again whenever the image changes."""
        input:
            image=IMAGE,
            digest=f"{IMAGE}.sha256",
        # Only the digest file: Snakemake would delete a directory() output before the job, and a folder of the
        # user's named by mistake must survive (unpack_image replaces only a folder it unpacked itself).
        output:
            SANDBOX_DIGEST,
        log:
            f"{RESULTS}/logs/unpack_image.log",
        params:
            python=HOST_PYTHON,
            sandbox=shlex.quote(SANDBOX),
        run:
            shell(
                "{params.python} -m hpcdl.unpack_image --image {input.image} --digest {input.digest}"
                " --sandbox {params.sandbox} 2> {log}"
            )


rule record_image:
    """Check the image against its .sha256 and record path, digest and apptainer version for the stages' runs (with
    `container_sandbox`: the folder they run from, checked to be unpacked from that image)."""
    input:
        image=IMAGE,
        digest=f"{IMAGE}.sha256",
        **({"sandbox_digest": SANDBOX_DIGEST} if SANDBOX else {}),
    output:
        IMAGE_RECORD,
    log:
        f"{RESULTS}/logs/record_image.log",
    params:
        python=HOST_PYTHON,
        sandbox=f"--sandbox {shlex.quote(SANDBOX)}" if SANDBOX else "",
    run:
        shell(
            "{params.python} -m hpcdl.record_image --image {input.image} --digest {input.digest} {params.sandbox}"
            " --out {output} 2> {log}"
        )
