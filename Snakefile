# TurboWan batch: a sheet of (image, prompt) rows in, one mp4 per row out.
# Stages: encode_prompt, encode_image -> sample_high -> sample_low -> decode -> encode_video.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/encode.smk"
include: "rules/sample.smk"
include: "rules/video.smk"


rule all:
    input:
        all_videos(),
    default_target: True
