from turbowan.runtime.jobs import model_job

model_job(
    snakemake, "encode_prompt", snakemake.wildcards.prompt_key,
    prompt_file=snakemake.input.prompt,
    text_encoder=snakemake.input.text_encoder,
    tokenizer=snakemake.input.tokenizer,
    device=snakemake.params.device,
    dtype=snakemake.params.dtype,
)
