from turbowan.jobs import run_stage
from turbowan.stages import sample_high

run_stage(
    "sample_high", snakemake.log[0], sample_high,
    gpus=snakemake.resources.get("gpu", 0),
    text=snakemake.input.text,
    cond=snakemake.input.cond,
    expert=snakemake.input.expert,
    out=snakemake.output[0],
    sampling=snakemake.params.sampling,
    video=snakemake.params.video,
    device=snakemake.params.device,
    dtype=snakemake.params.dtype,
    attention=snakemake.params.attention,
    sla_topk=snakemake.params.sla_topk,
)
