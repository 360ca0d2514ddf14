from turbowan.runtime.jobs import run_cpu_job
from turbowan.stages.video import save_last_frame

run_cpu_job("save_last_frame", snakemake.log[0], save_last_frame, key=snakemake.wildcards.id,
            frames_dir=snakemake.input.frames, out=snakemake.output[0])
