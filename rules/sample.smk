# Sampling, one expert per job: the high-noise steps, then the low-noise steps.
# sample_high outranks sample_low so that one GPU runs the high steps of every row first.


rule sample_high:
    input:
        text=text_for_row,
        cond=row_dir("cond.safetensors"),
        expert=MODEL_INPUTS["high"],
    output:
        row_dir("boundary.safetensors"),
    params:
        sampling=sampling_params,
        video=video_params,
        device=config["device"],
        dtype=config["dtype"],
        attention=config["attention"],
        sla_topk=config["sla_topk"],
    log:
        log_path("sample_high"),
    benchmark:
        benchmark_path("sample_high")
    priority: 10
    resources:
        gpu=1,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/sample_high.py"


rule sample_low:
    input:
        text=text_for_row,
        cond=row_dir("cond.safetensors"),
        boundary=row_dir("boundary.safetensors"),
        expert=MODEL_INPUTS["low"],
    output:
        row_dir("latent.safetensors"),
    params:
        sampling=sampling_params,
        video=video_params,
        device=config["device"],
        dtype=config["dtype"],
        attention=config["attention"],
        sla_topk=config["sla_topk"],
    log:
        log_path("sample_low"),
    benchmark:
        benchmark_path("sample_low")
    priority: 5
    resources:
        gpu=1,
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/sample_low.py"
