from turbowan.jobs import run_stage
from turbowan.report.previews import batch_sheet

run_stage("batch_contact_sheet", snakemake.log[0], batch_sheet, sheets=list(snakemake.input), out=snakemake.output[0])
