# What a person looks at after a batch: a contact sheet and an animated preview per video (one job,
# reading the mp4, since decoded frames are temporary), one contact sheet for the batch, and the
# gallery folder that `snakemake --report report.zip` shows. The gallery is also rebuilt by the
# Snakefile's onerror handler, so a batch with failed rows still gets one (showing their errors).
from turbowan.report.gallery import BatchInfo, build_gallery  # noqa: E402
from turbowan.report.summary import write_summary  # noqa: E402



# What the gallery shows besides the rows (turbowan.report.gallery.BatchInfo's fields).
GALLERY_INFO = dict(
    results=RESULTS,
    fps=config["video"]["fps"],
    checkpoints={key: MODELS[key] for key in ("high", "low", "vae", "text_encoder")},
    attention=f"{config['attention']} (SLA topk {config['sla_topk']})",
    embed=config["gallery"]["embed"],
)
GALLERY = f"{RESULTS}/gallery"

# Each row's file of a name, for rules that gather the whole batch.
ROW_FILES = {
    name: expand(f"{RESULTS}/{{id}}/{name}", id=ROWS)
    for name in ("video.mp4", "preview.gif", "contact_sheet.png")
}


rule previews:
    input:
        row_dir("video.mp4"),
    output:
        contact_sheet=row_dir("contact_sheet.png"),
        animation=row_dir("preview.gif"),
    params:
        prompt=lambda wildcards: ROWS[wildcards.id].prompt,
    log:
        log_path("previews"),
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/previews.py"


rule batch_contact_sheet:
    input:
        ROW_FILES["contact_sheet.png"],
    output:
        f"{RESULTS}/contact_sheet.png",
    log:
        f"{RESULTS}/logs/batch_contact_sheet.log",
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/batch_contact_sheet.py"


rule gallery:
    input:
        videos=ROW_FILES["video.mp4"],
        previews=ROW_FILES["preview.gif"],
        sheets=ROW_FILES["contact_sheet.png"],
        batch_sheet=f"{RESULTS}/contact_sheet.png",
        images=[row.image for row in ROWS.values()],
    output:
        report(
            directory(GALLERY),
            htmlindex="index.html",
            caption="../report/gallery.rst",
            category="Batch",
        ),
    params:
        rows=[row.as_dict() for row in ROWS.values()],
        info=GALLERY_INFO,
    log:
        f"{RESULTS}/logs/gallery.log",
    conda:
        "../envs/turbowan.yaml"
    script:
        "../scripts/gallery.py"
