from turbowan.demo import make_demo_models
from turbowan.runtime.jobs import run_cpu_job

run_cpu_job(
    "make_demo_models", snakemake.log[0], make_demo_models,
    high=snakemake.output.high,
    low=snakemake.output.low,
    vae=snakemake.output.vae,
    text_encoder=snakemake.output.text_encoder,
    tokenizer=snakemake.output.tokenizer,
    lora_high=snakemake.output.lora_high,
    lora_low=snakemake.output.lora_low,
    seed=snakemake.params.seed,
)
