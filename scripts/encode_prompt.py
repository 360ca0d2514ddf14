from turbowan.jobs import run_stage
from turbowan.stages import encode_prompt

run_stage(
    "encode_prompt", snakemake.log[0], encode_prompt,
    gpus=snakemake.resources.get("gpu", 0),
    prompt=snakemake.params.prompt,
    text_encoder=snakemake.input.text_encoder,
    tokenizer=snakemake.input.tokenizer,
    out=snakemake.output[0],
    device=snakemake.params.device,
    dtype=snakemake.params.dtype,
)
