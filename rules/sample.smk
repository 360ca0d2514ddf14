# Sampling, one expert per job: the high-noise steps, then the low-noise steps, one job per group
# of rows (common.smk, "Groups"). sample_high outranks sample_low so that one GPU runs every
# group's high steps first.


# What both expert stages take from the config (and the store).
EXPERT_PARAMS = {
    "device": config["device"],
    "dtype": config["dtype"],
    "attention": config["attention"],
    "sla_topk": config["sla_topk"],
    "activation_slices": config["activation_slices"],
    "compile": config["compile"],
    "store": STORE,
}


def sampling_rows(ids, out, also=()):
    """A group's rows as the sampling stages take them: paths by name (text, cond and the artifacts
    named in `also`), the row's values, and its output file `out`."""
    return [
        {
            "key": i,
            "text": text_for_row(i),
            "cond": row_path(i, "cond.safetensors"),
            **{name: row_path(i, f"{name}.safetensors") for name in also},
            "sampling": ROWS[i].sampling(),
            "video": ROWS[i].video(),
            "out": row_path(i, out),
        }
        for i in ids
    ]


for group, ids in ROW_GROUPS.items():

    rule:
        name:
            f"sample_high_{group}"
        input:
            text=[text_for_row(i) for i in ids],
            cond=[row_path(i, "cond.safetensors") for i in ids],
            expert=MODEL_INPUTS["high"],
        output:
            [row_path(i, "boundary.safetensors") for i in ids],
        params:
            rows=sampling_rows(ids, "boundary.safetensors"),
            **EXPERT_PARAMS,
        log:
            log_path("sample_high", group),
        benchmark:
            benchmark_path("sample_high", group)
        priority: 10
        resources:
            **group_resources("sample_high", len(ids)),
        conda:
            "../envs/turbowan.yaml"
        script:
            "../scripts/sample_high.py"

    rule:
        name:
            f"sample_low_{group}"
        input:
            text=[text_for_row(i) for i in ids],
            cond=[row_path(i, "cond.safetensors") for i in ids],
            boundary=[row_path(i, "boundary.safetensors") for i in ids],
            expert=MODEL_INPUTS["low"],
        output:
            [row_path(i, "latent.safetensors") for i in ids],
        params:
            rows=sampling_rows(ids, "latent.safetensors", also=("boundary",)),
            **EXPERT_PARAMS,
        log:
            log_path("sample_low", group),
        benchmark:
            benchmark_path("sample_low", group)
        priority: 5
        resources:
            **group_resources("sample_low", len(ids)),
        conda:
            "../envs/turbowan.yaml"
        script:
            "../scripts/sample_low.py"
