from turbowan.jobs import run_stage
from turbowan.stages import decode

run_stage(
    "decode", snakemake.log[0], decode,
    gpus=snakemake.resources.get("gpu", 0),
    latent=snakemake.input.latent,
    vae=snakemake.input.vae,
    out_dir=snakemake.output.frames,
    video=snakemake.params.video,
    device=snakemake.params.device,
    vae_dtype=snakemake.params.vae_dtype,
    frugal=snakemake.resources.frugal,
)
