# Conditioning: each prompt's umT5 embedding (shared by identical prompts) and each image's y.
# One job per group (common.smk, "Groups"); the rules are made in a loop, one per group.


for group, keys in PROMPT_GROUPS.items():

    rule:
        name:
            f"encode_prompt_{group}"
        input:
            text_encoder=MODEL_INPUTS["text_encoder"],
            tokenizer=MODEL_INPUTS["tokenizer"],
        output:
            [text_path(key) for key in keys],
        params:
            rows=[{"key": key, "prompt": PROMPTS[key], "out": text_path(key)} for key in keys],
            device=config["device"],
            dtype=config["dtype"],
            store=STORE,
        log:
            log_path("encode_prompt", group),
        benchmark:
            benchmark_path("encode_prompt", group)
        resources:
            **group_resources("encode_prompt", len(keys)),
        conda:
            "../envs/turbowan.yaml"
        script:
            "../scripts/encode_prompt.py"


for group, ids in ROW_GROUPS.items():

    rule:
        name:
            f"encode_image_{group}"
        input:
            images=[ROWS[i].image for i in ids],
            vae=MODEL_INPUTS["vae"],
        output:
            [row_path(i, "cond.safetensors") for i in ids],
        params:
            rows=[
                {"key": i, "image": ROWS[i].image, "video": ROWS[i].video(), "out": row_path(i, "cond.safetensors")}
                for i in ids
            ],
            device=config["device"],
            vae_dtype=config["vae_dtype"],
            store=STORE,
        log:
            log_path("encode_image", group),
        benchmark:
            benchmark_path("encode_image", group)
        retries: 1
        resources:
            **group_resources("encode_image", len(ids)),
        conda:
            "../envs/turbowan.yaml"
        script:
            "../scripts/encode_image.py"
