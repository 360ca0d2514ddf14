from turbowan.runtime.jobs import model_job

model_job(
    snakemake, "sample_high", snakemake.wildcards.id,
    text=snakemake.input.text,
    cond=snakemake.input.cond,
    expert=snakemake.input.expert,
    sampling=snakemake.params.sampling,
    video=snakemake.params.video,
    **snakemake.params.expert,
)
