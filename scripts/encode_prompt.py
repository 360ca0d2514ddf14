from turbowan.jobs import run_job

run_job(
    "encode_prompt", snakemake.log[0], "turbowan.stages:encode_prompts",
    gpus=snakemake.resources.get("gpu", 0),
    rows=snakemake.params.rows,
    text_encoder=snakemake.input.text_encoder,
    tokenizer=snakemake.input.tokenizer,
    device=snakemake.params.device,
    dtype=snakemake.params.dtype,
    store=snakemake.params.store,
    job_log=snakemake.log[0],
)
