from turbowan.runtime.jobs import model_job

model_job(
    snakemake, "decode", snakemake.wildcards.id,
    latent=snakemake.input.latent,
    vae=snakemake.input.vae,
    video=snakemake.params.video,
    device=snakemake.params.device,
    vae_dtype=snakemake.params.vae_dtype,
    frugal=bool(snakemake.resources.frugal),
    row=snakemake.wildcards.id,
)
