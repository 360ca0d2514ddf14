from turbowan.jobs import run_stage
from turbowan.report.previews import make_previews

run_stage(
    "previews", snakemake.log[0], make_previews,
    video=snakemake.input[0],
    contact_sheet_out=snakemake.output.contact_sheet,
    animation_out=snakemake.output.animation,
    row_id=snakemake.wildcards.id,
    prompt=snakemake.params.prompt,
)
