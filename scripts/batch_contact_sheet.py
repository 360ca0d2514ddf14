from turbowan.runtime.jobs import run_cpu_job
from turbowan.report.previews import batch_sheet

run_cpu_job("batch_contact_sheet", snakemake.log[0], batch_sheet, sheets=list(snakemake.input), out=snakemake.output[0])
