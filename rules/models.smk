# The built-in demo's tiny random-weight models, made once in the real checkpoint layouts, and
# its LoRA pair (ComfyUI's layout).


rule make_demo_models:
    output:
        high=DEMO_MODELS["high"],
        low=DEMO_MODELS["low"],
        vae=DEMO_MODELS["vae"],
        text_encoder=DEMO_MODELS["text_encoder"],
        tokenizer=directory(DEMO_MODELS["tokenizer"]),
        lora_high=DEMO_LORAS["high"],
        lora_low=DEMO_LORAS["low"],
    params:
        seed=config["models"].get("demo_seed", 0),
    log:
        "resources/demo-models/make_demo_models.log",
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/make_demo_models.py"


# A .pth checkpoint (a pickle) is converted once into safetensors, so that every later job
# streams its weights straight to the GPU. Cached: it reruns only when the .pth changes.
rule prepare_models:
    input:
        source=lambda wildcards: MODEL_PLAN.conversions[wildcards.name][1],
    output:
        f"{PREPARED}/{{name}}.safetensors",
    params:
        role=lambda wildcards: MODEL_PLAN.conversions[wildcards.name][0],
    log:
        f"{PREPARED}/logs/{{name}}.log",
    benchmark:
        f"{PREPARED}/logs/{{name}}.benchmark.tsv"
    wildcard_constraints:
        name="|".join(map(re.escape, MODEL_PLAN.conversions)) or "(?!)",
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/prepare_models.py"


# Model files named under the config's `download` that do not exist yet, one rule each
# (download_high, download_tokenizer, ...); offline, a download fails at once listing every file to
# fetch and where to put it. `snakemake download_models` fetches them all.
rule download_models:
    input:
        [item.dest for item in MODEL_PLAN.downloads],


for _item in MODEL_PLAN.downloads:

    rule:
        name:
            f"download_{_item.role}"
        output:
            directory(_item.dest) if _item.folder else _item.dest,
        params:
            item=_item,
            missing=MODEL_PLAN.downloads,
        log:
            LAYOUT.log("download_models", _item.role),
        localrule: True
        conda:
            "../envs/turbowan.yaml"
        script:
            "../scripts/download_model.py"
