from pathlib import Path

from turbowan.report.batch import build_batch_gallery
from turbowan.runtime.jobs import run_cpu_job

run_cpu_job(
    "gallery", snakemake.log[0], build_batch_gallery,
    config=snakemake.config,
    workflow_dir=Path(snakemake.scriptdir).parent,
    out_dir=snakemake.output[0],
)
