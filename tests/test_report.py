"""End to end, as a user sees it: a 3-row batch where one row fails, its summary, its report opened
in a real browser, then the row fixed and the single-file report.

One batch is run per module (tiny sizes, demo models built by the workflow itself):
  1. `snakemake --keep-going` with a fault injected into cafe.night's sample_low job: that row
     fails, the others finish; the onerror handler writes summary.csv and the gallery;
     then `--report report.zip`;
  2. without the fault, with gallery.embed set: the rerun finishes cafe.night only, the gallery
     rule remakes the gallery, onsuccess rewrites summary.csv; then `--report report.html`.
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
from tests.conftest import REPO, run_snakemake
from turbowan.gallery import EMBED_WARN_BYTES
from turbowan.jobs import FAULT_ENV
from turbowan.previews import SheetLayout, frame_count

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
    run_snakemake(workdir, "--report", "report.zip")
    return workdir


@pytest.fixture(scope="module")
def fixed_batch(batch):
    """Step 2: no fault, media embedded, the rerun finishing the row; report.html."""
    write_config(batch, embed=True)
    proc = run_snakemake(batch)
    run_snakemake(batch, "--report", "report.html")
    return batch, proc


def test_summary_after_keep_going_failure(batch):
    summary = read_csv(batch / "after-failure" / "summary.csv")
    assert list(summary) == ["harbour", "portrait-1", "cafe.night"]
    for rid in ("harbour", "portrait-1"):
        rec = summary[rid]
        assert rec["state"] == "done" and rec["error"] == ""
        assert all(rec[f"{stage}_state"] == "done" for stage in
                   ("encode_prompt", "encode_image", "sample_high", "sample_low", "decode", "encode_video"))
        assert float(rec["sample_high_s"]) > 0 and float(rec["total_s"]) > float(rec["sample_high_s"])
        assert (batch / rec["video"]).is_file()
    failed = summary[FAILED]
    assert failed["state"] == "failed" and failed["failed_stage"] == "sample_low"
    assert failed["error"] == f"RuntimeError: fault injected by {FAULT_ENV}"
    assert float(failed["sample_low_s"]) >= 0  # from the log's "sample_low failed after ... s"
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
    assert error == f"sample_low failed: RuntimeError: fault injected by {FAULT_ENV}"
    assert seen["sections"]["harbour"]["error"] is None
    assert "seed\t42" in seen["sections"]["harbour"]["text"] and "48 x 32" in seen["sections"]["harbour"]["text"]
    assert seen["counts"].startswith("3 rows: 2 done, 1 failed")


def test_fixed_row_reruns_alone_and_html_report_in_browser(fixed_batch):
    batch, proc = fixed_batch
    ran = re.findall(r"^(?:local)?rule (\w+):", proc.stderr, flags=re.M)
    # the rerun finishes the failed row from the failed stage on, and the pictures of the whole batch
    assert ran == ["sample_low", "decode", "encode_video", "previews", "batch_contact_sheet", "gallery", "all"]
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
