from turbowan.jobs import run_job

run_job(
    "encode_image", snakemake.log[0], "turbowan.stages:encode_images",
    gpus=snakemake.resources.get("gpu", 0),
    rows=snakemake.params.rows,
    vae=snakemake.input.vae,
    device=snakemake.params.device,
    vae_dtype=snakemake.params.vae_dtype,
    frugal=snakemake.resources.frugal,
    store=snakemake.params.store,
    job_log=snakemake.log[0],
)
