from turbowan.files.hub import download
from turbowan.runtime.jobs import run_cpu_job

run_cpu_job(
    "download_models", snakemake.log[0], download,
    item=snakemake.params.item,
    still_missing=snakemake.params.missing,
)
