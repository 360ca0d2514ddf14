# Conditioning: each prompt's umT5 embedding (shared by rows with the same prompt) and each row's y.


# The prompt's text is read from the sheet by its key: the sheet's free text never travels as a job
# parameter (parameters are shown in reports and logs). ancient(): editing other cells of the sheet
# reruns nothing here (a changed prompt is another key).
rule encode_prompt:
    input:
        sheet=ancient(config["sheet"]),
        text_encoder=MODEL_INPUTS["text_encoder"],
        tokenizer=MODEL_INPUTS["tokenizer"],
    output:
        LAYOUT.text("{prompt_key}"),
    params:
        prompt_key=wildcard("prompt_key"),
        device=config["device"],
        dtype=config["dtype"],
    log:
        LAYOUT.log("encode_prompt", "{prompt_key}"),
    benchmark:
        LAYOUT.benchmark("encode_prompt", "{prompt_key}")
    priority: wave_priority("encode_prompt")
    group: "encode_prompt"
    resources:
        gpu=1,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/encode_prompt.py"


# A row's first picture (and last, when it has one): a file, or another row's last frame.
rule encode_image:
    input:
        row_sources,
        unpack(row_images),
        vae=MODEL_INPUTS["vae"],
    output:
        LAYOUT.cond("{id}"),
    params:
        video=row_video,
        device=config["device"],
        vae_dtype=config["vae_dtype"],
    log:
        LAYOUT.log("encode_image", "{id}"),
    benchmark:
        LAYOUT.benchmark("encode_image", "{id}")
    priority: wave_priority("encode_image")
    group: model_group("encode_image")
    retries: 1
    resources:
        gpu=1,
        frugal=frugal_level,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/encode_image.py"
