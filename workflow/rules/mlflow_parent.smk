localrules:
    mlflow_parent,


rule mlflow_parent:
    """Open this invocation's parent MLflow run (on the login node) and hand its id to every stage."""
    output:
        temp(PARENT_RUN),
    container:
        CONTAINER
    log:
        PARENT_LOG,
    params:
        python=PYTHON,
        stage=lambda wildcards: stage_params(config=config),
    shell:
        "{params.python} -m hpcdl.mlflow_parent open --params {params.stage:q} --out {output} > {log} 2>&1"
