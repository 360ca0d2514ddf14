from turbowan.jobs import run_job

run_job(
    "sample_low", snakemake.log[0], "turbowan.stages:sample_low_rows",
    gpus=snakemake.resources.get("gpu", 0),
    rows=snakemake.params.rows,
    expert=snakemake.input.expert,
    device=snakemake.params.device,
    dtype=snakemake.params.dtype,
    attention=snakemake.params.attention,
    sla_topk=snakemake.params.sla_topk,
    activation_slices=snakemake.params.activation_slices,
    compile=snakemake.params.compile,
    store=snakemake.params.store,
    job_log=snakemake.log[0],
)
