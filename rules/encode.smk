# Conditioning: the prompt's umT5 embedding (shared by identical prompts) and the image's y.


rule encode_prompt:
    input:
        text_encoder=MODEL_INPUTS["text_encoder"],
        tokenizer=MODEL_INPUTS["tokenizer"],
    output:
        f"{RESULTS}/prompts/{{prompt_key}}/text.safetensors",
    params:
        prompt=lambda wildcards: PROMPTS[wildcards.prompt_key],
        device=config["device"],
        dtype=config["dtype"],
    log:
        log_path("encode_prompt", "{prompt_key}"),
    benchmark:
        benchmark_path("encode_prompt", "{prompt_key}")
    resources:
        gpu=1,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/encode_prompt.py"


rule encode_image:
    input:
        image=lambda wildcards: ROWS[wildcards.id].image,
        vae=MODEL_INPUTS["vae"],
    output:
        row_dir("cond.safetensors"),
    params:
        video=video_params,
        device=config["device"],
        vae_dtype=config["vae_dtype"],
    log:
        log_path("encode_image"),
    benchmark:
        benchmark_path("encode_image")
    retries: 1
    resources:
        gpu=1,
        frugal=frugal_level,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/encode_image.py"
