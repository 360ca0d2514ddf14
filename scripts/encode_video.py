from turbowan.runtime.jobs import run_cpu_job
from turbowan.stages.video import encode_video_and_pictures

run_cpu_job(
    "encode_video", snakemake.log[0], encode_video_and_pictures, key=snakemake.wildcards.id,
    frames_dir=snakemake.input.frames,
    out=snakemake.output.video,
    video=snakemake.params.video,
    fps=snakemake.params.fps,
    quality=snakemake.params.quality,
    sheet=snakemake.input.sheet,
    prompt_key=snakemake.params.prompt_key,
    contact_sheet_out=snakemake.output.contact_sheet,
    animation_out=snakemake.output.animation,
    row_id=snakemake.wildcards.id,
)
