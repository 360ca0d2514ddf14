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


rule sample_high:
    input:
        text=row_text,
        cond=LAYOUT.cond("{id}"),
        expert=MODEL_INPUTS["high"],
    output:
        LAYOUT.boundary("{id}"),
    params:
        sampling=row_sampling,
        video=row_video,
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
        text=row_text,
        cond=LAYOUT.cond("{id}"),
        boundary=LAYOUT.boundary("{id}"),
        expert=MODEL_INPUTS["low"],
    output:
        LAYOUT.latent("{id}"),
    params:
        sampling=row_sampling,
        video=row_video,
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
