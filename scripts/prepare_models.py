from turbowan.files.convert import prepare_model
from turbowan.runtime.jobs import run_cpu_job

run_cpu_job(
    "prepare_models", snakemake.log[0], prepare_model,
    source=snakemake.input.source,
    out=snakemake.output[0],
    role=snakemake.params.role,
)
