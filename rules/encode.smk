# Conditioning: each prompt's umT5 embedding (shared by rows with the same prompt) and each row's y.
from turbowan.files.prompts import write_prompt  # noqa: E402


# The prompt's text, written from the sheet into the results folder: jobs read it from there, so
# the sheet's free text never travels as a job parameter (parameters appear in reports and logs).
rule write_prompt:
    output:
        LAYOUT.prompt("{prompt_key}"),
    log:
        LAYOUT.log("write_prompt", "{prompt_key}"),
    priority: wave_priority("write_prompt")
    localrule: True
    run:
        write_prompt(output[0], PROMPTS[wildcards.prompt_key])


rule encode_prompt:
    input:
        prompt_file=LAYOUT.prompt("{prompt_key}"),
        text_encoder=MODEL_INPUTS["text_encoder"],
        tokenizer=MODEL_INPUTS["tokenizer"],
    output:
        LAYOUT.text("{prompt_key}"),
    params:
        device=config["device"],
        dtype=config["dtype"],
    log:
        LAYOUT.log("encode_prompt", "{prompt_key}"),
    benchmark:
        LAYOUT.benchmark("encode_prompt", "{prompt_key}")
    priority: wave_priority("encode_prompt")
    resources:
        gpu=1,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/encode_prompt.py"


rule encode_image:
    input:
        image=lambda wildcards: row_of(wildcards).image,
        vae=MODEL_INPUTS["vae"],
    output:
        LAYOUT.cond("{id}"),
    params:
        video=lambda wildcards: row_of(wildcards).video(),
        device=config["device"],
        vae_dtype=config["vae_dtype"],
    log:
        LAYOUT.log("encode_image", "{id}"),
    benchmark:
        LAYOUT.benchmark("encode_image", "{id}")
    priority: wave_priority("encode_image")
    retries: 1
    resources:
        gpu=1,
        frugal=frugal_level,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/encode_image.py"
