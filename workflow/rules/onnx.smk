# ONNX export of the trained and the fine-tuned model (config `onnx`; ONNX_MODELS, ONNX_TARGETS and onnx_data
# are in common.smk), each checked by ONNX Runtime against PyTorch on the test split of its own dataset.


rule onnx:
    """`snakemake all onnx`: both models exported and checked, whatever `onnx.export` says."""
    input:
        [f"{RESULTS}/onnx/{name}.onnx" for name in ONNX_MODELS],


rule export_onnx:
    """<model>.pt -> ONNX (dynamic batch), kept only if ONNX Runtime matches PyTorch on the test split."""
    input:
        unpack(onnx_data),
        **image_input(),
        model=f"{RESULTS}/{{model}}/model.pt",
    output:
        onnx=f"{RESULTS}/onnx/{{model}}.onnx",
        parity=f"{RESULTS}/onnx/{{model}}.json",
    wildcard_constraints:
        model="|".join(ONNX_MODELS),
    container:
        STAGE_IMAGE
    log:
        f"{RESULTS}/logs/export_onnx-{{model}}.log",
    params:
        python=STAGE_PYTHON,
        parent=PARENT_RUN,
        # Without `export` (it only decides whether `rule all` asks for the files) and `threads` (--threads below).
        stage=lambda wildcards: stage_params(onnx={k: v for k, v in config["onnx"].items() if k not in ("export", "threads")}),
        data_dir=lambda wildcards, input: os.path.dirname(input.manifest),
    threads: config["onnx"]["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{params.python} -m hpcdl.export_onnx --params {params.stage:q} --name {wildcards.model} --model {input.model}"
        " --data-dir {params.data_dir} --out {output.onnx} --parity-json {output.parity} --threads {threads}"
        " --parent-run {params.parent} 2>&1 | tee {log}"
