from turbowan.runtime.jobs import run_cpu_job
from turbowan.stages.video import encode_video

run_cpu_job(
    "encode_video", snakemake.log[0], encode_video, key=snakemake.wildcards.id,
    frames_dir=snakemake.input.frames,
    out=snakemake.output[0],
    video=snakemake.params.video,
    fps=snakemake.params.fps,
    quality=snakemake.params.quality,
)
