rule train:
    """Data-parallel training: `ranks` MPI ranks (mpirun here; srun --mpi=pmix in the Slurm profiles).
    Rank 0 checkpoints every epoch under train/checkpoints/, so a re-run resumes where a killed one stopped."""
    input:
        **image_input(),
        manifest=f"{RESULTS}/data/pretrain/manifest.json",
        **split_files("pretrain"),
    output:
        model=f"{RESULTS}/train/model.pt",
        metrics=f"{RESULTS}/train/metrics.json",
        curves=report(
            f"{RESULTS}/train/curves.png",
            caption="../report/train_curves.rst",
            category="Training",
            labels={"figure": "training curves"},
        ),
    log:
        f"{RESULTS}/logs/train.log",
    params:
        python=MPI_STAGE_PYTHON,
        launch=lambda wildcards, resources: mpi_launch(resources, "train"),
        warning=lambda wildcards, resources: launch_warning(resources, "train"),
        parent=PARENT_RUN,
        stage=lambda wildcards: stage_params(train=config["train"]),
        data_dir=lambda wildcards, input: os.path.dirname(input.manifest),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
    threads: config["train"]["ranks"] * config["train"]["threads_per_rank"]
    resources:
        # The launcher of the ranks: profiles set it to "srun --mpi=pmix" on Slurm; locally hpcdl.launch's mpirun.
        mpi=LOCAL_MPIRUN,
        **mpi_resources("train"),
        cpus_per_task=config["train"]["threads_per_rank"],
        mem_mb_per_cpu=2000,
        runtime=120,
    # run: + shell() rather than shell: keeps the launcher on the host even under `--sdm apptainer` (the
    # ranks enter the image themselves); a container directive would wrap mpirun/srun inside the image.
    # set -x: the job's log shows the launch line (launcher, image, arguments), after any oversubscription warning.
    run:
        shell(
            "({params.warning}set -x; {params.launch} {params.python} -m hpcdl.train --params {params.stage:q}"
            " --data-dir {params.data_dir} --out-dir {params.out_dir} --parent-run {params.parent}) 2>&1 | tee {log}"
        )
