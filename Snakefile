# TurboWan batch: a sheet of (image, prompt) rows in, one mp4 per row out.
# Stages, one job per row: encode_prompt, encode_image -> sample_high -> sample_low -> decode ->
# encode_video, then pictures per video and the gallery for `snakemake --report report.zip`. Rows
# chained by `@<id>` start from another row's last frame (save_last_frame); a sheet's chains are
# joined into longer videos (join_chain).
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# Every problem of the config at once, in a line each, and the schema's defaults filled in
# (turbowan.settings; Snakemake's own `validate` stops at the first problem).
sys.path.insert(0, workflow.basedir)
from turbowan.settings import ConfigError, check_config  # noqa: E402

try:
    check_config(config, f"{workflow.basedir}/config/schemas/config.schema.yaml")
except ConfigError as err:
    raise WorkflowError(str(err)) from None


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/encode.smk"
include: "rules/sample.smk"
include: "rules/video.smk"
include: "rules/report.smk"


rule all:
    input:
        [LAYOUT.video(row_id) for row_id in ROWS],
        [LAYOUT.chain(name) for name in CHAINS],
        LAYOUT.gallery,
    default_target: True


# <results>/summary.csv after every run that ran jobs, also when some failed (--keep-going). A failed
# row keeps the gallery rule from running, so the error handler builds the gallery from what exists.
onsuccess:
    write_summary(LAYOUT.results, ROWS.values())


onerror:
    write_summary(LAYOUT.results, ROWS.values())
    build_gallery(LAYOUT.gallery, ROWS.values(), batch_info(config))
