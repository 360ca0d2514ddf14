"""End to end, as a user sees it: a 4-row batch where one row fails, its summary, its report opened
in a real browser, then the row fixed and the single-file report.

One batch is run per module (tiny sizes, demo models built by the workflow itself):
  1. `snakemake --keep-going` with a fault injected into cafe.night's sample_low job: that job fails
     (Snakemake removes its output, so the row has no latent), the other rows finish; the onerror
     handler writes summary.csv and the gallery; then `--report report.zip`;
  2. without the fault, with gallery.embed set: the rerun runs cafe.night's jobs from sample_low on
     and nothing of the other rows (one job per row and stage), the gallery rule remakes the
     gallery, onsuccess rewrites summary.csv; then `--report report.html`.

The row `kite` has a prompt made to break out of a page (a </script>, an <img onerror>): the sheet's
free text is shown as text in every page of the reports, and no script of it runs.
"""

import csv
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import numpy as np
import yaml
from PIL import Image

from tests.browser import ARTIFACTS, gallery_in_report, scripts_run_in_pages
from tests.conftest import REPO, file_ids, jobs_run, run_snakemake
from turbowan.report.gallery import EMBED_WARN_BYTES
from turbowan.report.previews import SheetLayout, frame_count
from turbowan.report.summary import benchmark_seconds
from turbowan.runtime.faults import FAULT_ENV

pytestmark = pytest.mark.slow

FPS = 16
# A prompt that would run scripts if a page put it in unescaped: in HTML text, in an attribute, in a
# <script> block (or JSON inside one). The sheet's CSV doubles its quotes.
HOSTILE_PROMPT = ('</script><script>window.__pwned=1</script> a kite over the dunes '
                  '<img src=x onerror="window.__pwned=2">')
SHEET = f"""id,image,prompt,seed,num_frames,width,height,num_steps
harbour,images/harbour.png,"A small boat leaves the harbour at dawn, gulls circling.",42,9,48,32,4
portrait-1,images/portrait.jpg,"She turns to the camera and says ""hello""; soft light.",7,13,32,48,2
cafe.night,images/cafe.png,"Café in Montréal at night — neon signs flicker, 夜の雨",,17,32,32,4
kite,images/harbour.png,"{HOSTILE_PROMPT.replace('"', '""')}",3,5,32,32,2
"""
FRAMES = {"harbour": 9, "portrait-1": 13, "cafe.night": 17, "kite": 5}
SIZES = {"harbour": (48, 32), "portrait-1": (32, 48), "cafe.night": (32, 32), "kite": (32, 32)}
FAILED = "cafe.night"
DONE_ROWS = ("harbour", "portrait-1", "kite")
MODEL_STAGES = ("encode_prompt", "encode_image", "sample_high", "sample_low", "decode")
STAGES = (*MODEL_STAGES, "encode_video")
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


def assert_no_script_ran(pages: dict[str, dict[str, str]]) -> None:
    ran = {page: frames for page, frames in pages.items() if frames}
    assert not ran, f"the sheet's text ran as a script (window.__pwned set) in {ran}"


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """The batch after step 1 (failed row); what later steps change is snapshotted here first."""
    workdir = tmp_path_factory.mktemp("batch")
    shutil.copytree(REPO / "config" / "demo" / "images", workdir / "images")
    (workdir / "sheet.csv").write_text(SHEET, encoding="utf-8")
    write_config(workdir, embed=False)
    results = workdir / "results"

    proc = run_snakemake(workdir, "--keep-going", check=False, extra_env={FAULT_ENV: f"sample_low:{FAILED}"})
    assert proc.returncode != 0, f"the fault injected into {FAILED}'s sample_low should have failed the run"
    assert "Error in rule sample_low" in proc.stdout + proc.stderr
    snapshot = workdir / "after-failure"
    snapshot.mkdir()
    shutil.copy(results / "summary.csv", snapshot / "summary.csv")
    for name in ("logs", "benchmarks", "gallery"):  # the rerun rewrites the failed row's
        shutil.copytree(results / name, snapshot / name)
    run_snakemake(workdir, "--report", "report.zip")
    return workdir


@pytest.fixture(scope="module")
def fixed_batch(batch):
    """Step 2: no fault, media embedded, the rerun finishing the row; report.html."""
    write_config(batch, embed=True)
    results = batch / "results" / FAILED
    # the failed job's output was removed; what came before it stays
    assert (results / "boundary.safetensors").is_file()
    assert not any((results / name).exists() for name in ("latent.safetensors", "frames", "video.mp4"))
    before = file_ids(batch)
    proc = run_snakemake(batch)
    after = file_ids(batch)
    run_snakemake(batch, "--report", "report.html")
    return batch, proc, before, after


def test_summary_after_keep_going_failure(batch):
    snapshot = batch / "after-failure"
    summary = read_csv(snapshot / "summary.csv")
    assert list(summary) == ["harbour", "portrait-1", "cafe.night", "kite"]
    for rid in DONE_ROWS:
        rec = summary[rid]
        assert rec["state"] == "done" and rec["error"] == "" and rec["failed_stage"] == ""
        assert all(rec[f"{stage}_state"] == "done" for stage in STAGES)
        # Each stage of a row is a job of its own: its time is the job's Snakemake benchmark, and
        # its log (the row's own) says it is done; a model stage's log comes from the worker.
        times = []
        for stage in STAGES:
            key = rec["prompt_key"] if stage == "encode_prompt" else rid
            seconds = benchmark_seconds(snapshot / "benchmarks" / stage / f"{key}.tsv")
            assert seconds is not None and seconds > 0, (stage, rid)
            assert float(rec[f"{stage}_s"]) == round(seconds, 2), (stage, rec)
            times.append(seconds)
            row_log = (snapshot / "logs" / stage / f"{key}.log").read_text()
            assert f"{stage} done in " in row_log, (stage, row_log)
            if stage in MODEL_STAGES:
                assert f"{stage} of {key} in worker pid" in row_log, (stage, row_log)
        assert float(rec["total_s"]) == round(sum(times), 2)
        assert (batch / rec["video"]).is_file()
    assert summary["kite"]["prompt"] == HOSTILE_PROMPT  # the text as written, not escaped or cut
    failed = summary[FAILED]
    assert failed["state"] == "failed" and failed["failed_stage"] == "sample_low"
    assert failed["error"] == FAULT
    row_log = (snapshot / "logs" / "sample_low" / f"{FAILED}.log").read_text()
    after = re.search(r"sample_low of cafe\.night failed after ([0-9.]+) s", row_log)
    assert after and float(failed["sample_low_s"]) == float(after[1]) >= 0, row_log
    assert [failed[f"{s}_state"] for s in ("sample_high", "sample_low", "decode", "encode_video")] == \
        ["done", "failed", "missing", "missing"]


def test_contact_sheets_and_previews(batch):
    results = batch / "results"
    layout = SheetLayout()
    for rid in DONE_ROWS:
        sheet = Image.open(results / rid / "contact_sheet.png")
        assert sheet.size == layout.size(*SIZES[rid])
        pixels = np.asarray(sheet.convert("RGB"), dtype=np.float64)
        tile_w, tile_h = layout.tile_size(*SIZES[rid])
        tile = pixels[layout.gap:layout.gap + tile_h, layout.gap:layout.gap + tile_w]
        assert tile.var() > 0 and pixels.var() > 0
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
    assert set(videos) == set(DONE_ROWS)
    for rid, video in videos.items():
        assert video["error"] is None and video["readyState"] >= 1
        assert video["duration"] == pytest.approx(FRAMES[rid] / FPS, abs=1.5 / FPS)
        assert (video["width"], video["height"]) == SIZES[rid]
    # four input images, three previews, three row contact sheets (the batch's needs every row); an
    # <img> of the hostile prompt would be one more, and broken
    assert len(seen["images"]) == 10
    assert all(img["complete"] and img["width"] > 0 for img in seen["images"]), seen["images"]
    error = seen["sections"][FAILED]["error"]
    assert error == f"sample_low failed: {FAULT}"
    assert seen["sections"]["harbour"]["error"] is None
    assert "seed\t42" in seen["sections"]["harbour"]["text"] and "48 x 32" in seen["sections"]["harbour"]["text"]
    assert HOSTILE_PROMPT in seen["sections"]["kite"]["text"]  # shown as text
    assert seen["counts"].startswith("4 rows: 3 done, 1 failed")
    assert seen["pwned"] == {}


def test_no_page_of_the_zip_report_runs_the_sheets_text(batch):
    """report.html, every page of the zip (every page report.html links is one of them), and the
    gallery's index.html, each opened on its own: no script of the hostile prompt runs."""
    report = unzip(batch / "report.zip", batch / "unzipped-pages")
    root = report.parent
    pages = sorted(root.rglob("*.html"))
    linked = set(re.findall(r"data/[^\"'\s\\<>]+?\.html", report.read_text(encoding="utf-8")))
    assert linked, "report.html links no page of its data folder (the gallery's index.html)"
    assert {root / rel for rel in linked} <= set(pages), linked
    gallery_pages = [page for page in pages if page.name == "index.html"]
    assert len(gallery_pages) == 1 and report in pages
    assert HOSTILE_PROMPT.replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;") in \
        gallery_pages[0].read_text(encoding="utf-8")
    assert_no_script_ran(scripts_run_in_pages(root, pages))
    # the gallery as the onerror handler wrote it into the results folder
    gallery = batch / "after-failure" / "gallery"
    assert_no_script_ran(scripts_run_in_pages(gallery, [gallery / "index.html"]))


def test_the_page_check_sees_a_script_that_runs(tmp_path):
    """The check above would fail: the prompt pasted into a page unescaped sets window.__pwned."""
    page = tmp_path / "unescaped.html"
    page.write_text(f"<!DOCTYPE html><html><body><script>var prompt = '{HOSTILE_PROMPT}';</script>"
                    f"<p>{HOSTILE_PROMPT}</p></body></html>", encoding="utf-8")
    found = scripts_run_in_pages(tmp_path, [page])
    assert set(found["unescaped.html"].values()) <= {"1", "2"} and found["unescaped.html"]


def test_fixed_row_reruns_alone_and_html_report_in_browser(fixed_batch):
    batch, proc, before, after = fixed_batch
    # The rerun runs the failed row's jobs from the failed stage on, and the pictures of the batch:
    # no job of another row (each row and stage is a job of its own).
    ran = jobs_run(proc.stdout + proc.stderr)
    assert ran == ["sample_low", "decode", "encode_video", "batch_contact_sheet", "gallery", "all"], ran
    # Every artifact that existed is the same file as before; the failed row's latent and video are new.
    assert {path: after.get(path) for path in before} == before
    assert set(after) - set(before) == {f"results/{FAILED}/latent.safetensors", f"results/{FAILED}/video.mp4"}
    logs, old_logs = batch / "results" / "logs", batch / "after-failure" / "logs"
    for stage in ("sample_low", "decode", "encode_video"):
        for rid in FRAMES:
            row_log = (logs / stage / f"{rid}.log").read_text()
            if rid == FAILED:
                assert f"{stage} done in " in row_log, row_log
            else:  # not run again: its log is the first run's
                assert row_log == (old_logs / stage / f"{rid}.log").read_text(), (stage, rid)
    summary = read_csv(batch / "results" / "summary.csv")
    assert {rec["state"] for rec in summary.values()} == {"done"}
    # media embedded: the folder holds one page (and Snakemake's marker, which reports ignore)
    gallery = batch / "results" / "gallery"
    assert sorted(p.name for p in gallery.iterdir()) == [".snakemake_timestamp", "index.html"]
    assert (gallery / "index.html").stat().st_size < EMBED_WARN_BYTES
    assert_no_script_ran(scripts_run_in_pages(gallery, [gallery / "index.html"]))

    seen = gallery_in_report(batch / "report.html", ARTIFACTS / "report-html.png")
    videos = {v["row"]: v for v in seen["videos"]}
    assert set(videos) == set(FRAMES)
    for rid, video in videos.items():
        assert video["readyState"] >= 1 and video["duration"] == pytest.approx(FRAMES[rid] / FPS, abs=1.5 / FPS)
        assert (video["width"], video["height"]) == SIZES[rid]
    assert len(seen["images"]) == 13 and all(img["width"] > 0 for img in seen["images"])
    assert all(section["error"] is None for section in seen["sections"].values())
    assert HOSTILE_PROMPT in seen["sections"]["kite"]["text"]
    assert seen["pwned"] == {}
    assert_no_script_ran(scripts_run_in_pages(batch, [batch / "report.html"]))
