rule preprocess:
    """Decode once into uint8 (N, C, H, W) arrays per split + manifest.json (stats, sha256, provenance)."""
    input:
        **image_input(),
        fetched=f"{RESULTS}/raw/{{role}}/fetch.json",
    output:
        **split_files("{role}"),
        manifest=f"{RESULTS}/data/{{role}}/manifest.json",
    container:
        STAGE_IMAGE
    log:
        f"{RESULTS}/logs/preprocess_{{role}}.log",
    params:
        python=STAGE_PYTHON,
        parent=PARENT_RUN,
        stage=lambda wildcards: stage_params(
            role=wildcards.role,
            data={k: v for k, v in config["data"].items() if k not in ROLES and k != "mirror"},
        ),
        raw_dir=lambda wildcards, input: os.path.dirname(input.fetched),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{params.python} -m hpcdl.preprocess --params {params.stage:q} --raw-dir {params.raw_dir}"
        " --out-dir {params.out_dir} --parent-run {params.parent} 2>&1 | tee {log}"
