from turbowan.runtime.jobs import run_cpu_job
from turbowan.stages.video import join_chain

run_cpu_job("join_chain", snakemake.log[0], join_chain, key=snakemake.wildcards.chain,
            frames_dirs=list(snakemake.input.frames), continues=list(snakemake.params.continues),
            out=snakemake.output[0], fps=snakemake.params.fps, quality=snakemake.params.quality)
