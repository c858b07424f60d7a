rule finetune:
    """Transfer learning: new head, frozen backbone, then everything at a lower LR; optional scratch baseline."""
    input:
        **image_input(),
        init=finetune_init_file,
        manifest=f"{RESULTS}/data/finetune/manifest.json",
        **split_files("finetune"),
    output:
        model=f"{RESULTS}/finetune/model.pt",
        metrics=f"{RESULTS}/finetune/metrics.json",
        confusion=report(
            f"{RESULTS}/finetune/confusion_matrix.png",
            caption="../report/confusion_matrix.rst",
            category="Fine-tuning",
            labels={"figure": "confusion matrix (fine-tuned)"},
        ),
        curves=report(
            f"{RESULTS}/finetune/curves.png",
            caption="../report/finetune_curves.rst",
            category="Fine-tuning",
            labels={"figure": "fine-tuned vs baseline"},
        ),
    log:
        f"{RESULTS}/logs/finetune.log",
    params:
        python=MPI_STAGE_PYTHON,
        launch=lambda wildcards, resources: mpi_launch(resources, "finetune"),
        warning=lambda wildcards, resources: launch_warning(resources, "finetune"),
        parent=PARENT_RUN,
        stage=lambda wildcards: stage_params(
            finetune=config["finetune"],
            train={k: config["train"][k] for k in ("model", *TRAIN_COMPUTE_KEYS)},
        ),
        data_dir=lambda wildcards, input: os.path.dirname(input.manifest),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
    threads: config["finetune"]["ranks"] * config["finetune"]["threads_per_rank"]
    resources:
        mpi=LOCAL_MPIRUN,
        **mpi_resources("finetune"),
        cpus_per_task=config["finetune"]["threads_per_rank"],
        mem_mb_per_cpu=2000,
        runtime=120,
    # run: + shell() rather than shell: keeps the launcher on the host even under `--sdm apptainer` (the
    # ranks enter the image themselves); a container directive would wrap mpirun/srun inside the image.
    # set -x: the job's log shows the launch line (launcher, image, arguments), after any oversubscription warning.
    run:
        shell(
            "({params.warning}set -x; {params.launch} {params.python} -m hpcdl.finetune --params {params.stage:q}"
            " --init {input.init} --data-dir {params.data_dir} --out-dir {params.out_dir}"
            " --parent-run {params.parent}) 2>&1 | tee {log}"
        )
