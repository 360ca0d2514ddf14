# What a person looks at after a batch, besides each row's pictures (made with its mp4, rule
# encode_video): one contact sheet for the batch, and the gallery folder that
# `snakemake --report report.zip` shows. The gallery is also rebuilt by the
# Snakefile's onerror handler, so a batch with failed rows still gets one (showing their errors).
from turbowan.report.batch import batch_info  # noqa: E402
from turbowan.report.gallery import build_gallery  # noqa: E402
from turbowan.report.summary import write_summary  # noqa: E402



rule batch_contact_sheet:
    input:
        [LAYOUT.contact_sheet(row_id) for row_id in ROWS],
    output:
        LAYOUT.batch_sheet,
    log:
        LAYOUT.log("batch_contact_sheet", "batch"),
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/batch_contact_sheet.py"


rule gallery:
    input:
        videos=[LAYOUT.video(row_id) for row_id in ROWS],
        previews=[LAYOUT.preview(row_id) for row_id in ROWS],
        batch_sheet=LAYOUT.batch_sheet,
        images=[LAYOUT.image(cell) for row in ROWS.values() for cell in (row.image, row.last_image) if cell],
    output:
        report(
            directory(LAYOUT.gallery),
            htmlindex="index.html",
            caption="../report/gallery.rst",
            category="Batch",
        ),
    log:
        LAYOUT.log("gallery", "batch"),
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/gallery.py"
