from turbowan.runtime.jobs import model_job

model_job(
    snakemake, "sample_low", snakemake.wildcards.id,
    text=snakemake.input.text,
    cond=snakemake.input.cond,
    boundary=snakemake.input.boundary,
    expert=snakemake.input.expert,
    sampling=snakemake.params.sampling,
    video=snakemake.params.video,
    **snakemake.params.expert,
)
