from turbowan.report.gallery import BatchInfo, build_gallery
from turbowan.jobs import run_stage
from turbowan.sheet import Row

run_stage(
    "gallery", snakemake.log[0], build_gallery,
    out_dir=snakemake.output[0],
    rows=[Row(**row) for row in snakemake.params.rows],
    info=BatchInfo(**snakemake.params.info),
)
