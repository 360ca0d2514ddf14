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


# A row's LoRAs (turbowan/loras.py; LORA_PLAN in common.smk) for one expert: their files are inputs
# (a replaced file reruns the rows that use it), and the set [{name, file, scale}] travels inside the
# `sampling` parameter, and only for rows that have one, so a row without LoRAs keeps exactly the
# parameters it always had; a changed scale changes that row's parameters, so Snakemake reruns it.
def row_lora_files(expert):
    return of_wildcards(lambda wildcards: LORA_PLAN.files(wildcards.id, expert))


def row_sampling_loras(expert):
    def sampling(wildcards):
        values = ROWS[wildcards.id].sampling()
        loras = LORA_PLAN.sets[wildcards.id][expert]
        return {**values, "loras": loras} if loras else values

    return of_wildcards(sampling)


rule sample_high:
    input:
        row_lora_files("high"),
        text=row_text,
        cond=LAYOUT.cond("{id}"),
        expert=MODEL_INPUTS["high"],
    output:
        LAYOUT.boundary("{id}"),
    params:
        sampling=row_sampling_loras("high"),
        video=row_video,
        **EXPERT_PARAMS,
    log:
        LAYOUT.log("sample_high", "{id}"),
    benchmark:
        LAYOUT.benchmark("sample_high", "{id}")
    priority: wave_priority("sample_high")
    group: model_group("sample_high")
    resources:
        gpu=1,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/sample_high.py"


rule sample_low:
    input:
        row_lora_files("low"),
        text=row_text,
        cond=LAYOUT.cond("{id}"),
        boundary=LAYOUT.boundary("{id}"),
        expert=MODEL_INPUTS["low"],
    output:
        LAYOUT.latent("{id}"),
    params:
        sampling=row_sampling_loras("low"),
        video=row_video,
        **EXPERT_PARAMS,
    log:
        LAYOUT.log("sample_low", "{id}"),
    benchmark:
        LAYOUT.benchmark("sample_low", "{id}")
    priority: wave_priority("sample_low")
    group: model_group("sample_low")
    resources:
        gpu=1,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/sample_low.py"
