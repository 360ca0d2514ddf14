from turbowan.jobs import run_stage
from turbowan.stages import encode_image

run_stage(
    "encode_image", snakemake.log[0], encode_image,
    gpus=snakemake.resources.get("gpu", 0),
    image=snakemake.input.image,
    vae=snakemake.input.vae,
    out=snakemake.output[0],
    video=snakemake.params.video,
    device=snakemake.params.device,
    vae_dtype=snakemake.params.vae_dtype,
    frugal=snakemake.resources.frugal,
)
