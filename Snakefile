# hpcdl: fetch -> preprocess -> data-parallel train -> evaluate -> fine-tune, every stage tracked in MLflow.
# This file only validates the configuration and includes one rule file per stage (workflow/rules/<stage>.smk);
# each rule runs the module of the same name: rule `train` -> `python -m hpcdl.train` (src/hpcdl/train.py).
import os

from snakemake.utils import min_version, validate

from hpcdl.config_check import check_config

min_version("9.0")


configfile: "config/config.yaml"


# One line per bad key (key, value, what is allowed) before Snakemake's validate, which fills in the defaults.
check_config(config, os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml"))
validate(config, "workflow/schemas/config.schema.yaml")


# `snakemake --report report.html`: this description, then the outputs marked report() (captions: workflow/report/).
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/containers.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/autoencode.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/onnx.smk"


rule all:
    input:
        f"{RESULTS}/evaluate/metrics.json",
        f"{RESULTS}/finetune/metrics.json",
        *SWEEP_TARGETS,  # with a non-empty sweep.grid: the sweep's summary (workflow/rules/sweep.smk)
        *ONNX_TARGETS,  # with onnx.export: the ONNX files of both models (workflow/rules/onnx.smk)
    default_target: True


# One parent MLflow run per invocation that has jobs to run (Snakemake runs onstart only then, on the
# submitting host, never inside jobs); every stage's run becomes its child. See common.smk:open_parent_run.
onstart:
    open_parent_run()


onsuccess:
    close_parent_run("FINISHED")


onerror:
    close_parent_run("FAILED")
