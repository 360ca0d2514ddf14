from turbowan.files.convert import prepare_model
from turbowan.jobs import run_stage

run_stage(
    "prepare_models", snakemake.log[0], prepare_model,
    source=snakemake.input.source,
    out=snakemake.output[0],
    role=snakemake.params.role,
)
