"""End to end, as a user sees it: a 3-row batch where one row fails, its summary, its report opened
in a real browser, then the row fixed and the single-file report.

One batch is run per module (tiny sizes, demo models built by the workflow itself):
  1. `snakemake --keep-going` with a fault injected into cafe.night's sample_low job: that row
     fails, the others finish; the onerror handler writes summary.csv and the gallery;
     then `--report report.zip`;
  2. without the fault, with gallery.embed set: the rerun computes cafe.night only (its group's
     jobs run again and link the other rows' results from the store), the gallery rule remakes
     the gallery, onsuccess rewrites summary.csv; then `--report report.html`.

The three rows are one group (the default batch_rows): one job per GPU stage, named `<stage>_harbour~cafe.night`.
"""

import csv
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.browser import ARTIFACTS, gallery_in_report
from tests.conftest import REPO, file_ids, run_snakemake
from turbowan.files.artifacts import failure_record
from turbowan.report.gallery import EMBED_WARN_BYTES
from turbowan.jobs import FAULT_ENV
from turbowan.report.previews import SheetLayout, frame_count

pytestmark = pytest.mark.slow

FPS = 16
SHEET = """id,image,prompt,seed,num_frames,width,height,num_steps
harbour,images/harbour.png,"A small boat leaves the harbour at dawn, gulls circling.",42,9,48,32,4
portrait-1,images/portrait.jpg,"She turns to the camera and says ""hello""; soft light.",7,13,32,48,2
cafe.night,images/cafe.png,"Café in Montréal at night — neon signs flicker, 夜の雨",,17,32,32,4
"""
FRAMES = {"harbour": 9, "portrait-1": 13, "cafe.night": 17}
SIZES = {"harbour": (48, 32), "portrait-1": (32, 48), "cafe.night": (32, 32)}
FAILED = "cafe.night"
GROUP = "harbour~cafe.night"  # every row in one group job per GPU stage
GPU_STAGES = ("encode_prompt", "encode_image", "sample_high", "sample_low", "decode")
STAGES = (*GPU_STAGES, "encode_video")
FAULT = f"RuntimeError: fault injected by {FAULT_ENV} for sample_low:{FAILED}"


def write_config(workdir: Path, embed: bool) -> None:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(sheet="sheet.csv", results="results", device="cpu")
    config["defaults"]["num_frames"] = 9
    config["video"] = {"fps": FPS, "quality": 8}
    config["gallery"] = {"embed": embed}
    (workdir / "config").mkdir(exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {rec["id"]: rec for rec in csv.DictReader(f)}


def unzip(archive: Path, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as z:
        z.extractall(dest)
    return dest / archive.stem / "report.html"


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """The batch after step 2 (failed row); what later steps change is snapshotted here first."""
    workdir = tmp_path_factory.mktemp("batch")
    shutil.copytree(REPO / "config" / "demo" / "images", workdir / "images")
    (workdir / "sheet.csv").write_text(SHEET, encoding="utf-8")
    write_config(workdir, embed=False)
    results = workdir / "results"

    proc = run_snakemake(workdir, "--keep-going", check=False, extra_env={FAULT_ENV: f"sample_low:{FAILED}"})
    assert proc.returncode != 0, f"the fault injected into {FAILED}'s sample_low should have failed the run"
    snapshot = workdir / "after-failure"
    snapshot.mkdir()
    shutil.copy(results / "summary.csv", snapshot / "summary.csv")
    shutil.copytree(results / "logs", snapshot / "logs")  # the rerun rewrites the per-row logs
    run_snakemake(workdir, "--report", "report.zip")
    return workdir


@pytest.fixture(scope="module")
def fixed_batch(batch):
    """Step 2: no fault, media embedded, the rerun finishing the row; report.html."""
    write_config(batch, embed=True)
    latent = batch / "results" / FAILED / "latent.safetensors"  # its failure record, or nothing once a
    assert not latent.exists() or failure_record(latent)["failed_stage"] == "sample_low"  # run swept it
    before = file_ids(batch)
    proc = run_snakemake(batch)
    after = file_ids(batch)
    run_snakemake(batch, "--report", "report.html")
    return batch, proc, before, after


def test_summary_after_keep_going_failure(batch):
    summary = read_csv(batch / "after-failure" / "summary.csv")
    assert list(summary) == ["harbour", "portrait-1", "cafe.night"]
    for rid in ("harbour", "portrait-1"):
        rec = summary[rid]
        assert rec["state"] == "done" and rec["error"] == ""
        assert all(rec[f"{stage}_state"] == "done" for stage in STAGES)
        # Each row's own time in a group job: its per-row log's "done in" line (a tiny row may
        # take under 0.05 s: 0.0); encode_video is a job per row, timed by its benchmark.
        for stage in GPU_STAGES:
            key = rec["prompt_key"] if stage == "encode_prompt" else rid
            row_log = (batch / "after-failure" / "logs" / stage / f"{key}.log").read_text()
            done = re.search(rf"row {re.escape(key)}: {stage} done in ([0-9.]+) s", row_log)
            assert done and float(rec[f"{stage}_s"]) == float(done[1]), (stage, rec, row_log)
        assert float(rec["encode_video_s"]) > 0
        assert float(rec["total_s"]) == pytest.approx(sum(float(rec[f"{s}_s"]) for s in STAGES), abs=0.02)
        assert (batch / rec["video"]).is_file()
    failed = summary[FAILED]
    assert failed["state"] == "failed" and failed["failed_stage"] == "sample_low"
    assert failed["error"] == FAULT
    assert float(failed["sample_low_s"]) >= 0  # from its row log's "sample_low failed after ... s"
    assert [failed[f"{s}_state"] for s in ("sample_high", "sample_low", "decode", "encode_video")] == \
        ["done", "failed", "missing", "missing"]


def test_contact_sheets_and_previews(batch):
    results = batch / "results"
    layout = SheetLayout()
    heights = []
    for rid in ("harbour", "portrait-1"):
        sheet = Image.open(results / rid / "contact_sheet.png")
        assert sheet.size == layout.size(*SIZES[rid])
        pixels = np.asarray(sheet.convert("RGB"), dtype=np.float64)
        tile_w, tile_h = layout.tile_size(*SIZES[rid])
        tile = pixels[layout.gap:layout.gap + tile_h, layout.gap:layout.gap + tile_w]
        assert tile.var() > 0 and pixels.var() > 0
        heights.append(sheet.height)
        preview = Image.open(results / rid / "preview.gif")
        assert preview.size == SIZES[rid] and preview.n_frames == FRAMES[rid]
        assert frame_count(results / rid / "video.mp4") == FRAMES[rid]
    assert not (results / FAILED / "contact_sheet.png").exists()


def test_report_zip_in_browser(batch):
    """The zip report: every finished row plays, every image decodes, the failed row shows its error."""
    report = unzip(batch / "report.zip", batch / "unzipped")
    seen = gallery_in_report(report, ARTIFACTS / "report-zip.png")
    print(f"screenshot: {ARTIFACTS / 'report-zip.png'}")
    videos = {v["row"]: v for v in seen["videos"]}
    assert set(videos) == {"harbour", "portrait-1"}
    for rid, video in videos.items():
        assert video["error"] is None and video["readyState"] >= 1
        assert video["duration"] == pytest.approx(FRAMES[rid] / FPS, abs=1.5 / FPS)
        assert (video["width"], video["height"]) == SIZES[rid]
    # three input images, two previews, two row contact sheets (the batch's needs every row)
    assert len(seen["images"]) == 7
    assert all(img["complete"] and img["width"] > 0 for img in seen["images"]), seen["images"]
    error = seen["sections"][FAILED]["error"]
    assert error == f"sample_low failed: {FAULT}"
    assert seen["sections"]["harbour"]["error"] is None
    assert "seed\t42" in seen["sections"]["harbour"]["text"] and "48 x 32" in seen["sections"]["harbour"]["text"]
    assert seen["counts"].startswith("3 rows: 2 done, 1 failed")


def test_fixed_row_reruns_alone_and_html_report_in_browser(fixed_batch):
    batch, proc, before, after = fixed_batch
    ran = re.findall(r"^(?:local)?rule (\S+):", proc.stderr, flags=re.M)
    # The rerun runs the failed row's group from the failed stage on, then each row's mp4 and
    # previews (Snakemake reruns what a rerun job's outputs feed), and the pictures of the batch ...
    assert ran[:2] == [f"sample_low_{GROUP}", f"decode_{GROUP}"], ran
    assert sorted(ran[2:-3]) == ["encode_video"] * 3 + ["previews"] * 3, ran
    assert ran[-3:] == ["batch_contact_sheet", "gallery", "all"], ran
    # ... but computes only the failed row: every other artifact is the same file as before (its
    # group mates' results linked again from the store); the failed row's latent, a failure record
    # before (its new file may get the freed inode number), is a latent now, and its video is new.
    latent = f"results/{FAILED}/latent.safetensors"
    kept = {path: ino for path, ino in before.items() if path != latent}
    assert {path: after.get(path) for path in kept} == kept
    assert set(after) - set(kept) == {latent, f"results/{FAILED}/video.mp4"}
    assert failure_record(batch / latent) is None
    logs = batch / "results" / "logs"
    for stage in ("sample_low", "decode", "encode_video"):
        for rid in FRAMES:
            row_log = (logs / stage / f"{rid}.log").read_text()
            if rid == FAILED:
                assert re.search(rf"row {re.escape(rid)}: {stage} done in ", row_log), row_log
            else:
                assert f"row {rid} (" in row_log and f"{stage} reused from the store" in row_log, row_log
                assert not re.search(rf"row {re.escape(rid)}: {stage} done in ", row_log), row_log
    summary = read_csv(batch / "results" / "summary.csv")
    assert {rec["state"] for rec in summary.values()} == {"done"}
    # media embedded: the folder holds one page (and Snakemake's marker, which reports ignore)
    gallery = batch / "results" / "gallery"
    assert sorted(p.name for p in gallery.iterdir()) == [".snakemake_timestamp", "index.html"]
    assert (gallery / "index.html").stat().st_size < EMBED_WARN_BYTES

    seen = gallery_in_report(batch / "report.html", ARTIFACTS / "report-html.png")
    videos = {v["row"]: v for v in seen["videos"]}
    assert set(videos) == set(FRAMES)
    for rid, video in videos.items():
        assert video["readyState"] >= 1 and video["duration"] == pytest.approx(FRAMES[rid] / FPS, abs=1.5 / FPS)
        assert (video["width"], video["height"]) == SIZES[rid]
    assert len(seen["images"]) == 10 and all(img["width"] > 0 for img in seen["images"])
    assert all(section["error"] is None for section in seen["sections"].values())
