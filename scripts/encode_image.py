from turbowan.runtime.jobs import model_job

model_job(
    snakemake, "encode_image", snakemake.wildcards.id,
    image=snakemake.input.image,
    vae=snakemake.input.vae,
    video=snakemake.params.video,
    device=snakemake.params.device,
    vae_dtype=snakemake.params.vae_dtype,
    frugal=bool(snakemake.resources.frugal),
    row=snakemake.wildcards.id,
)
