from turbowan.jobs import run_stage
from turbowan.mp4 import encode_video

run_stage(
    "encode_video", snakemake.log[0], encode_video,
    frames_dir=snakemake.input.frames,
    out=snakemake.output[0],
    video=snakemake.params.video,
    fps=snakemake.params.fps,
    quality=snakemake.params.quality,
    key=snakemake.wildcards.id,
    store=snakemake.params.store,
)
