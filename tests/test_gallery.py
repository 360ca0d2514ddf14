"""The gallery page built from a results folder: media placed or embedded, failures and text shown."""

import base64
import re

import pytest

from tests.conftest import write_image
from tests.test_previews import make_video
from turbowan.report.gallery import BatchInfo, build_gallery
from turbowan.report.previews import animated_preview, contact_sheet
from turbowan.sheet import Row
from turbowan.report.summary import STAGES, stage_output


def row(rid, image, prompt):
    return Row(id=rid, image=str(image), prompt=prompt, seed=3, num_frames=17, width=48, height=32,
               num_steps=4, sigma_max=200.0, boundary=0.9, ode=False)


@pytest.fixture
def results(tmp_path):
    """Row `ok` finished (video, previews, benchmarks); row `bad` failed in decode."""
    results = tmp_path / "results"
    ok = row("ok", write_image(tmp_path / "ok.png", 60, 40), "A <b>bold</b> boat & sea")
    bad = row("bad", write_image(tmp_path / "bad.png", 60, 40, seed=1), "Night café")
    (results / "ok").mkdir(parents=True)
    video = make_video(tmp_path)
    (results / "ok" / "video.mp4").write_bytes(video.read_bytes())
    contact_sheet(video, results / "ok" / "contact_sheet.png", "ok", ok.prompt)
    animated_preview(video, results / "ok" / "preview.gif")
    for r in (ok, bad):
        for stage in STAGES:
            if r is bad and stage in ("decode", "encode_video"):
                continue
            out = stage_output(results, r, stage)
            out.parent.mkdir(parents=True, exist_ok=True)
            if stage == "decode":
                continue  # frames are temporary: the mp4 stands for them
            if not out.exists():
                out.write_bytes(b"x")
    log = results / "logs" / "decode" / "bad.log"
    log.parent.mkdir(parents=True)
    log.write_text("INFO decode on host\nERROR turbowan.job: decode failed after 1.5 s\n"
                   "Traceback (most recent call last):\n"
                   "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB\n")
    return results, [ok, bad]


def info(results, embed):
    return BatchInfo(results=str(results), fps=16, embed=embed,
                     checkpoints={"high": "/models/TurboWan2.2-I2V-A14B-high-720P.safetensors"})


def test_gallery_with_media_files(results):
    folder, rows = results
    index = build_gallery(folder / "gallery", rows, info(folder, embed=False))
    page = index.read_text()
    files = sorted(str(p.relative_to(folder / "gallery")) for p in (folder / "gallery").rglob("*") if p.is_file())
    assert files == ["bad/input.png", "index.html", "ok/contact_sheet.png", "ok/input.png", "ok/preview.gif",
                     "ok/video.mp4"]
    assert (folder / "gallery" / "ok" / "video.mp4").read_bytes() == (folder / "ok" / "video.mp4").read_bytes()
    assert page.count("<video") == 1 and "src='ok/video.mp4'" in page
    assert "decode failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB" in page
    assert "A &lt;b&gt;bold&lt;/b&gt; boat &amp; sea" in page and "<b>bold</b>" not in page
    assert "TurboWan2.2-I2V-A14B-high-720P.safetensors" in page and "/models/" not in page
    assert "17 (1.06 s at 16 fps)" in page
    assert "2 rows: 1 done, 1 failed, 0 incomplete." in page
    assert not list(folder.glob(".gallery*"))  # built beside, renamed into place


def test_embedded_gallery_is_one_file(results):
    folder, rows = results
    build_gallery(folder / "gallery", rows, info(folder, embed=False))
    index = build_gallery(folder / "gallery", rows, info(folder, embed=True))  # replaces the old folder
    assert [p.name for p in (folder / "gallery").iterdir()] == ["index.html"]
    page = index.read_text()
    (video_src,) = re.findall(r"<video[^>]* src='(data:video/mp4;base64,[^']+)'", page)
    assert base64.b64decode(video_src.split(",", 1)[1]) == (folder / "ok" / "video.mp4").read_bytes()
    assert len(re.findall(r"<img[^>]* src='data:image/(?:png|gif);base64,", page)) == 4


def test_chained_rows_show_where_they_start_and_end_and_their_chain(tmp_path):
    results = tmp_path / "results"
    first = row("first", write_image(tmp_path / "a.png", 60, 40), "A boat")
    last = write_image(tmp_path / "the <end> 'café'.png", 40, 60, seed=3)  # a hostile file name, escaped
    second = row("second", "@first", "The boat sails on")
    first = Row(**{**first.as_dict(), "chain": "trip"})
    second = Row(**{**second.as_dict(), "chain": "trip", "last_image": str(last)})
    (results / "first").mkdir(parents=True)
    write_image(results / "first" / "last_frame.png", 48, 32, seed=4)  # what save_last_frame made
    (results / "chains").mkdir()
    (results / "chains" / "trip.mp4").write_bytes(make_video(tmp_path).read_bytes())
    page = build_gallery(results / "gallery", [first, second], info(results, embed=False)).read_text()
    assert "<h2 id='chains'>Chains</h2>" in page and "chain trip: first + second" in page
    assert page.count("class='chain-video'") == 1 and "src='chains/trip.mp4'" in page
    assert (results / "gallery" / "chains" / "trip.mp4").read_bytes() == (results / "chains" / "trip.mp4").read_bytes()
    # the second row starts from the first one's last frame and ends on the given picture
    assert "<td>starts from</td><td>the last frame of row first</td>" in page
    assert "<td>ends on</td><td>the &lt;end&gt; &#x27;café&#x27;.png</td>" in page and "<end>" not in page
    assert "<td>chain</td><td>trip (chains/trip.mp4)</td>" in page
    assert (results / "gallery" / "second" / "input.png").is_file()  # the first row's last frame
    assert (results / "gallery" / "second" / "last_input.png").is_file()
    assert page.count("given last frame") == 1
