# Sweeps (config `sweep`): one training per point of sweep.grid (rule train_sweep), then one summary of them all
# (rule sweep_summary). The points and their helpers: common.smk (SWEEP_POINTS, sweep_point, sweep_train).


rule train_sweep:
    """One point of a sweep: rule train's training (`python -m hpcdl.train`) with the point's values in the train
    section, on the same preprocessed data, as its own job with its own ranks and its own MLflow run
    (`train_sweep-<point>`). Its model is logged with the run, not registered."""
    input:
        **image_input(),
        manifest=f"{RESULTS}/data/pretrain/manifest.json",
        **split_files("pretrain"),
    output:
        model=f"{SWEEP_DIR}/{{point}}/train/model.pt",
        metrics=f"{SWEEP_DIR}/{{point}}/train/metrics.json",
    log:
        f"{RESULTS}/logs/train_sweep/{{point}}.log",
    wildcard_constraints:
        point=POINT_PATTERN,
    params:
        python=MPI_STAGE_PYTHON,
        launch=lambda wildcards, resources: mpi_launch(resources, "train", sweep_train(wildcards)),
        warning=lambda wildcards, resources: launch_warning(resources, "train", sweep_train(wildcards)),
        parent=PARENT_RUN,
        stage=lambda wildcards: stage_params(
            train=sweep_train(wildcards), sweep={"point": wildcards.point, "values": sweep_point(wildcards)}
        ),
        data_dir=lambda wildcards, input: os.path.dirname(input.manifest),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
    threads: lambda wildcards: sweep_train(wildcards)["ranks"] * config["train"]["threads_per_rank"]
    resources:
        # As rule train's, from the point's ranks: `tasks` or `tasks_per_node` (the other one unset).
        mpi=LOCAL_MPIRUN,
        nodes=config["train"]["nodes"],
        tasks=lambda wildcards: mpi_resources("train", sweep_train(wildcards)).get("tasks"),
        tasks_per_node=lambda wildcards: mpi_resources("train", sweep_train(wildcards)).get("tasks_per_node"),
        cpus_per_task=config["train"]["threads_per_rank"],
        mem_mb_per_cpu=2000,
        runtime=120,
    # As rule train: run: + shell() keeps the launcher on the host under `--sdm apptainer`.
    run:
        shell(
            "({params.warning}set -x; {params.launch} {params.python} -m hpcdl.train --params {params.stage:q}"
            " --data-dir {params.data_dir} --out-dir {params.out_dir} --parent-run {params.parent}) 2>&1 | tee {log}"
        )


rule sweep_summary:
    """The sweep's table (summary.csv) and plots: samples/s, seconds to sweep.target_val_accuracy and final val
    accuracy per point, the sweet spot marked (hpcdl.sweep_summary says how it is chosen)."""
    input:
        **image_input(),
        metrics=sweep_metrics,
    output:
        csv=f"{SWEEP_DIR}/summary.csv",
        throughput=report(f"{SWEEP_DIR}/throughput.png", caption="../report/sweep_throughput.rst", category="Sweep"),
        time_to_target=report(
            f"{SWEEP_DIR}/time_to_target.png", caption="../report/sweep_time_to_target.rst", category="Sweep"
        ),
        final_accuracy=report(
            f"{SWEEP_DIR}/final_accuracy.png", caption="../report/sweep_final_accuracy.rst", category="Sweep"
        ),
    container:
        STAGE_IMAGE
    log:
        f"{RESULTS}/logs/sweep_summary.log",
    params:
        python=STAGE_PYTHON,
        parent=PARENT_RUN,
        stage=lambda wildcards, input: stage_params(
            sweep={
                "grid": config["sweep"]["grid"],
                "target_val_accuracy": config["sweep"]["target_val_accuracy"],
                "points": [
                    {"name": name, "values": values, "metrics": path}
                    for (name, values), path in zip(SWEEP_POINTS.items(), input.metrics)
                ],
            }
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output.csv),
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.python} -m hpcdl.sweep_summary --params {params.stage:q} --out-dir {params.out_dir}"
        " --parent-run {params.parent} 2>&1 | tee {log}"
