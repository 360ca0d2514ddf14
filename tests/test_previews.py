"""Contact sheets and animated previews, made from a real H.264 mp4 whose frames we know."""

import numpy as np
import pytest
from PIL import Image

from turbowan.report.previews import (
    SheetLayout, animated_preview, batch_sheet, caption_lines, contact_sheet, evenly_spaced, frame_count,
)
from turbowan.files.video import write_mp4

from .conftest import prompt_sheet

W, H, FRAMES, FPS = 48, 32, 17, 16


def make_video(folder, frames=FRAMES, width=W, height=H):
    """An mp4 whose frame i is a horizontal gradient at brightness 10 + 14*i: frames are told apart
    by their mean, and no frame is flat."""
    files = []
    ramp = np.linspace(0, 40, width)[None, :, None]
    for i in range(frames):
        frame = np.clip(10 + 14 * i + ramp + np.zeros((height, width, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.png"
        Image.fromarray(frame).save(path)
        files.append(path)
    video = folder / "video.mp4"
    write_mp4(files, video, width, height, FPS, quality=10)
    return video


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video"))


def tile_means(sheet: Image.Image, layout: SheetLayout, width: int, height: int) -> list[float]:
    pixels = np.asarray(sheet.convert("L"), dtype=np.float64)
    tile_w, tile_h = layout.tile_size(width, height)
    means = []
    for i in range(layout.count):
        col, row = i % layout.columns, i // layout.columns
        x, y = layout.gap + col * (tile_w + layout.gap), layout.gap + row * (tile_h + layout.gap)
        means.append(pixels[y + 2:y + tile_h - 2, x + 2:x + tile_w - 2].mean())
    return means


def test_evenly_spaced():
    assert evenly_spaced(17, 8) == [0, 2, 5, 7, 9, 11, 14, 16]
    assert evenly_spaced(81, 2) == [0, 80]
    assert evenly_spaced(5, 8) == [0, 1, 2, 3, 4]
    assert evenly_spaced(9, 1) == [0]


def test_contact_sheet_grid(video, tmp_path):
    layout = SheetLayout()
    out = contact_sheet(video, tmp_path / "sheet.png", "harbour", "A boat leaves the harbour", layout)
    sheet = Image.open(out)
    # frames narrower than a tile keep their size: 48 x 32 tiles
    assert sheet.size == layout.size(W, H) == (4 * 48 + 5 * 6, 2 * 32 + 3 * 6 + 3 * 16 + 6)
    assert np.asarray(sheet).var() > 0
    means = tile_means(sheet, layout, W, H)
    expected = [10 + 14 * i + 20 for i in evenly_spaced(FRAMES, layout.count)]  # ramp mean is 20
    assert means == pytest.approx(expected, abs=6)  # the right frames, in order (H.264 is lossy)
    caption = np.asarray(sheet.convert("L"))[-3 * 16:, :]
    assert caption.max() > 200  # the caption's text is drawn


def test_contact_sheet_of_a_large_portrait_video(tmp_path):
    video = make_video(tmp_path, frames=5, width=160, height=240)
    layout = SheetLayout(count=4, columns=2, tile_width=100)
    sheet = Image.open(contact_sheet(video, tmp_path / "s.png", "p", "prompt", layout))
    # larger frames are scaled down to tiles 100 px wide, keeping their aspect ratio
    assert sheet.size == layout.size(160, 240) == (2 * 100 + 3 * 6, 2 * 150 + 3 * 6 + 3 * 16 + 6)
    means = tile_means(sheet, layout, 160, 240)
    assert means == sorted(means) and np.asarray(sheet).var() > 0


def test_caption_is_cut_to_its_lines():
    lines = caption_lines("row-7", "word " * 200, SheetLayout(), 400)
    assert lines[0] == "row-7" and len(lines) == 3 and lines[-1].endswith("…")
    assert caption_lines("r", "short", SheetLayout(), 400) == ["r", "short"]


def test_batch_sheet_stacks_row_sheets(video, tmp_path):
    first = contact_sheet(video, tmp_path / "a.png", "a", "first")
    second = contact_sheet(video, tmp_path / "b.png", "b", "second")
    combined = Image.open(batch_sheet([first, second], tmp_path / "all.png"))
    single = Image.open(first)
    assert combined.size == (single.width, 2 * single.height)
    assert np.array_equal(np.asarray(combined)[: single.height], np.asarray(single.convert("RGB")))


def test_animated_preview(video, tmp_path):
    out = animated_preview(video, tmp_path / "p.gif", max_side=24, max_frames=6)
    gif = Image.open(out)
    assert gif.size == (24, 16) and gif.n_frames == 6 and gif.info["loop"] == 0
    # six frames shown for as long as the 17-frame video lasts
    assert gif.info["duration"] == pytest.approx(1000 * FRAMES / FPS / 6, abs=10)
    means = []
    for i in range(gif.n_frames):
        gif.seek(i)
        means.append(np.asarray(gif.convert("L"), dtype=np.float64).mean())
    assert means == sorted(means) and means[-1] - means[0] > 150


def test_frame_count(video):
    assert frame_count(video) == FRAMES


def test_the_mp4_and_preview_jobs_run_without_torch(tmp_path):
    """These are per-row CPU jobs, one after another with `--cores 1`: importing torch would add
    a second and a half to each. Their whole job, logging included, runs in a process without it."""
    import subprocess
    import sys

    import torch

    from turbowan.files.video import save_frames

    frames = torch.stack([torch.full((H, W, 3), 10 + 14 * i, dtype=torch.uint8) for i in range(FRAMES)])
    save_frames(frames, tmp_path / "frames", {"made_by": "this test"})
    sheet, key = prompt_sheet(tmp_path, "a prompt")
    code = f"""
import sys
from turbowan.runtime.jobs import run_cpu_job
from turbowan.stages.video import encode_video_and_pictures
out = {str(tmp_path)!r}
run_cpu_job("encode_video", out + "/logs/encode_video.log", encode_video_and_pictures, key="row0",
            frames_dir=out + "/frames", out=out + "/video.mp4",
            video={{"width": {W}, "height": {H}, "num_frames": {FRAMES}}}, fps={FPS}, quality=8,
            sheet={sheet!r}, prompt_key={key!r}, contact_sheet_out=out + "/sheet.png",
            animation_out=out + "/preview.gif", row_id="row0")
print("torch imported:", "torch" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "torch imported: False"
    assert frame_count(tmp_path / "video.mp4") == FRAMES
    assert (tmp_path / "sheet.png").is_file() and (tmp_path / "preview.gif").is_file()
    assert (tmp_path / "video.mp4").stat().st_nlink == 1  # written in place: no second link anywhere
    assert "encode_video done in" in (tmp_path / "logs" / "encode_video.log").read_text()


def test_frames_are_counted_from_the_packets_as_decoding_counts_them(video, tmp_path):
    """write_mp4's check counts packets (no decode); that is the number of frames a decoder gets."""
    from turbowan.files.video import VideoError, count_frames, probe

    assert count_frames(video) == probe(video)["frames"] == FRAMES
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[: video.stat().st_size // 2])  # the index (moov) is at the end
    with pytest.raises(VideoError, match="could not count its frames"):
        count_frames(cut)
