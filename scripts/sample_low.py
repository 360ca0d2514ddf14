from turbowan.jobs import run_stage
from turbowan.stages import sample_low

run_stage(
    "sample_low", snakemake.log[0], sample_low,
    gpus=snakemake.resources.get("gpu", 0),
    text=snakemake.input.text,
    cond=snakemake.input.cond,
    boundary=snakemake.input.boundary,
    expert=snakemake.input.expert,
    out=snakemake.output[0],
    sampling=snakemake.params.sampling,
    video=snakemake.params.video,
    device=snakemake.params.device,
    dtype=snakemake.params.dtype,
    attention=snakemake.params.attention,
    sla_topk=snakemake.params.sla_topk,
)
