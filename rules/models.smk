# The built-in demo's tiny random-weight models, made once in the real checkpoint layouts.


rule make_demo_models:
    output:
        high=DEMO_MODELS["high"],
        low=DEMO_MODELS["low"],
        vae=DEMO_MODELS["vae"],
        text_encoder=DEMO_MODELS["text_encoder"],
        tokenizer=directory(DEMO_MODELS["tokenizer"]),
    params:
        seed=MODELS.get("demo_seed", 0),
    log:
        "resources/demo-models/make_demo_models.log",
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/make_demo_models.py"
