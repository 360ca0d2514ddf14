# Sampling, one expert per job: the high-noise steps, then the low-noise steps, one job per row.


# What both expert stages take from the config (the stage functions' argument names).
EXPERT_PARAMS = {
    "device": config["device"],
    "dtype": config["dtype"],
    "attention": config["attention"],
    "sla_topk": config["sla_topk"],
    "activation_slices": config["activation_slices"],
    "compile": config["compile"],
}


def text_of(wildcards):
    return LAYOUT.text(row_of(wildcards).prompt_key)


rule sample_high:
    input:
        text=text_of,
        cond=LAYOUT.cond("{id}"),
        expert=MODEL_INPUTS["high"],
    output:
        LAYOUT.boundary("{id}"),
    params:
        sampling=lambda wildcards: row_of(wildcards).sampling(),
        video=lambda wildcards: row_of(wildcards).video(),
        **EXPERT_PARAMS,
    log:
        LAYOUT.log("sample_high", "{id}"),
    benchmark:
        LAYOUT.benchmark("sample_high", "{id}")
    priority: wave_priority("sample_high")
    resources:
        gpu=1,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/sample_high.py"


rule sample_low:
    input:
        text=text_of,
        cond=LAYOUT.cond("{id}"),
        boundary=LAYOUT.boundary("{id}"),
        expert=MODEL_INPUTS["low"],
    output:
        LAYOUT.latent("{id}"),
    params:
        sampling=lambda wildcards: row_of(wildcards).sampling(),
        video=lambda wildcards: row_of(wildcards).video(),
        **EXPERT_PARAMS,
    log:
        LAYOUT.log("sample_low", "{id}"),
    benchmark:
        LAYOUT.benchmark("sample_low", "{id}")
    priority: wave_priority("sample_low")
    resources:
        gpu=1,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/sample_low.py"
