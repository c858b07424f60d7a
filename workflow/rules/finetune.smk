def finetune_init_file(wildcards):
    """The model fine-tuning starts from: this workflow's pretrained model or fetched torchvision weights."""
    init = config["finetune"]["init"]
    if init == "pretrain":
        return f"{RESULTS}/train/model.pt"
    return f"{RESULTS}/raw/weights/{init.split(':', 1)[1]}.pth"


rule finetune:
    """Transfer learning: new head, frozen backbone, then everything at a lower LR; optional scratch baseline."""
    input:
        parent=ancient(PARENT_RUN),
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
        ),
    log:
        f"{RESULTS}/logs/finetune.log",
    params:
        stage=lambda wildcards: stage_params(
            finetune=config["finetune"],
            train={k: config["train"][k] for k in ("model", "backend", "precision", "grad_accum_steps", "nesterov", "schedule", "warmup_epochs")},
        ),
        data_dir=lambda wildcards, input: os.path.dirname(input.manifest),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
    threads: config["finetune"]["ranks"] * config["finetune"]["threads_per_rank"]
    resources:
        mpi="mpirun --bind-to none",
        tasks=config["finetune"]["ranks"],
        cpus_per_task=config["finetune"]["threads_per_rank"],
        mem_mb_per_cpu=2000,
        runtime=120,
    shell:
        "{resources.mpi} -n {resources.tasks} {PYTHON} -m hpcdl.finetune --params {params.stage:q}"
        " --init {input.init} --data-dir {params.data_dir} --out-dir {params.out_dir}"
        " --parent-run {input.parent} 2>&1 | tee {log}"
