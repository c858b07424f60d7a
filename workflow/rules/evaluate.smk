rule evaluate:
    """Test-split accuracy, loss, per-class precision/recall/F1, confusion matrix and misclassified grid."""
    input:
        **image_input(),
        model=f"{RESULTS}/train/model.pt",
        manifest=f"{RESULTS}/data/pretrain/manifest.json",
        **split_files("pretrain"),
    output:
        metrics=f"{RESULTS}/evaluate/metrics.json",
        confusion=report(
            f"{RESULTS}/evaluate/confusion_matrix.png",
            caption="../report/confusion_matrix.rst",
            category="Evaluation",
            labels={"figure": "confusion matrix"},
        ),
        misclassified=report(
            f"{RESULTS}/evaluate/misclassified.png",
            caption="../report/misclassified.rst",
            category="Evaluation",
            labels={"figure": "misclassified test images"},
        ),
    container:
        STAGE_IMAGE
    log:
        f"{RESULTS}/logs/evaluate.log",
    params:
        python=STAGE_PYTHON,
        parent=PARENT_RUN,
        stage=lambda wildcards: stage_params(),
        data_dir=lambda wildcards, input: os.path.dirname(input.manifest),
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{params.python} -m hpcdl.evaluate --params {params.stage:q} --model {input.model}"
        " --data-dir {params.data_dir} --out-dir {params.out_dir} --parent-run {params.parent} 2>&1 | tee {log}"
