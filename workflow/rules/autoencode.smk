rule autoencode:
    """Data-parallel training of a convolutional autoencoder on the pretraining dataset, launched like train
    (`ranks` MPI ranks, checkpoint every epoch under autoencode/checkpoints/, resumable). Its encoder is what
    finetune.init: autoencoder starts from."""
    input:
        **image_input(),
        manifest=f"{RESULTS}/data/pretrain/manifest.json",
        **split_files("pretrain"),
    output:
        model=f"{RESULTS}/autoencode/model.pt",
        metrics=f"{RESULTS}/autoencode/metrics.json",
        reconstructions=report(
            f"{RESULTS}/autoencode/reconstructions.png",
            caption="../report/reconstructions.rst",
            category="Autoencoder",
        ),
    log:
        f"{RESULTS}/logs/autoencode.log",
    params:
        python=MPI_STAGE_PYTHON,
        launch=lambda wildcards, resources: mpi_launch(resources, "autoencode"),
        warning=lambda wildcards, resources: launch_warning(resources, "autoencode"),
        parent=PARENT_RUN,
        stage=lambda wildcards: stage_params(
            autoencode=config["autoencode"],
            train={k: config["train"][k] for k in TRAIN_COMPUTE_KEYS},
        ),
        data_dir=lambda wildcards, input: os.path.dirname(input.manifest),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
    threads: config["autoencode"]["ranks"] * config["autoencode"]["threads_per_rank"]
    resources:
        mpi=LOCAL_MPIRUN,
        **mpi_resources("autoencode"),
        cpus_per_task=config["autoencode"]["threads_per_rank"],
        mem_mb_per_cpu=2000,
        runtime=120,
    # run: + shell() rather than shell: keeps the launcher on the host even under `--sdm apptainer` (the
    # ranks enter the image themselves); a container directive would wrap mpirun/srun inside the image.
    # set -x: the job's log shows the launch line (launcher, image, arguments), after any oversubscription warning.
    run:
        shell(
            "({params.warning}set -x; {params.launch} {params.python} -m hpcdl.autoencode --params {params.stage:q}"
            " --data-dir {params.data_dir} --out-dir {params.out_dir} --parent-run {params.parent}) 2>&1 | tee {log}"
        )
