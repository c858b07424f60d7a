"""hpcdl: a Snakemake pipeline that fetches data, trains data-parallel over MPI, evaluates and fine-tunes,
each stage a module of this package (rule `train` -> `hpcdl.train`) tracked in MLflow."""

__version__ = "0.1.0"
