# TurboWan batch: a sheet of (image, prompt) rows in, one mp4 per row out.
# Stages: encode_prompt, encode_image -> sample_high -> sample_low -> decode -> encode_video,
# then a contact sheet and preview per video, and the gallery for `snakemake --report report.zip`.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schemas/config.schema.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/encode.smk"
include: "rules/sample.smk"
include: "rules/video.smk"
include: "rules/report.smk"


rule all:
    input:
        all_videos(),
        GALLERY,
    default_target: True


# The fork server of a local run (rules/common.smk), stopped by both handlers below.
onstart:
    start_fork_server()


# <results>/summary.csv after every run that ran jobs, also when some failed (--keep-going).
# A failed row keeps the gallery rule from running, so the handler builds the gallery itself.
onsuccess:
    forkserver.stop()
    write_summary(RESULTS, ROWS.values())
    clean_store()


onerror:
    forkserver.stop()
    write_summary(RESULTS, ROWS.values())
    build_gallery(GALLERY, ROWS.values(), BatchInfo(**GALLERY_INFO))
