from turbowan.files.hub import download
from turbowan.jobs import run_stage

run_stage(
    "download_models", snakemake.log[0], download,
    item=snakemake.params.item,
    still_missing=snakemake.params.missing,
)
