from turbowan.report.previews import make_previews
from turbowan.runtime.jobs import run_cpu_job

run_cpu_job(
    "previews", snakemake.log[0], make_previews, key=snakemake.wildcards.id,
    video=snakemake.input.video,
    prompt_file=snakemake.input.prompt,
    contact_sheet_out=snakemake.output.contact_sheet,
    animation_out=snakemake.output.animation,
    row_id=snakemake.wildcards.id,
)
