localrules:
    fetch,
    fetch_weights,


rule fetch:
    """Copy an embedded dataset or download one (sha256-verified). Local: login nodes have internet."""
    input:
        **image_input(),
    output:
        f"{RESULTS}/raw/{{role}}/fetch.json",
    container:
        STAGE_IMAGE
    log:
        f"{RESULTS}/logs/fetch_{{role}}.log",
    params:
        python=STAGE_PYTHON,
        parent=PARENT_RUN,
        stage=lambda wildcards: stage_params(
            role=wildcards.role,
            dataset=config["data"][wildcards.role],
            mirror=config["data"].get("mirror", {}),
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "{params.python} -m hpcdl.fetch --params {params.stage:q} --out-dir {params.out_dir}"
        " --parent-run {params.parent} 2>&1 | tee {log}"


rule fetch_weights:
    """Download (or copy) the torchvision weights named by finetune.init/finetune.weights, sha256-verified."""
    input:
        **image_input(),
    output:
        f"{RESULTS}/raw/weights/{{arch}}.pth",
    container:
        STAGE_IMAGE
    log:
        f"{RESULTS}/logs/fetch_weights_{{arch}}.log",
    params:
        python=STAGE_PYTHON,
        parent=PARENT_RUN,
        stage=lambda wildcards: stage_params(weights=config["finetune"]["weights"], arch=wildcards.arch),
    shell:
        "{params.python} -m hpcdl.fetch --params {params.stage:q} --weights-out {output}"
        " --parent-run {params.parent} 2>&1 | tee {log}"
