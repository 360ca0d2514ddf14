"""Pictures of a finished video: a contact sheet (PNG grid of frames + caption) and a small GIF.

Both read the mp4 itself (decoded frames are temporary), keep only the frames they need, and have
a layout fixed by a few numbers, so their size is known in advance and tests can check it.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files.artifacts import atomic_path
from ..files.prompts import read_prompt

FONT_FILES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",)


class PreviewError(RuntimeError):
    pass


@dataclass(frozen=True)
class SheetLayout:
    """A contact sheet: `count` frames in `columns` columns, a caption below.

    Tiles are `tile_width` wide, or as wide as the frames when these are narrower (never enlarged).
    """

    count: int = 8
    columns: int = 4
    tile_width: int = 192
    gap: int = 6
    caption_lines: int = 3
    line_height: int = 16

    @property
    def rows(self) -> int:
        return math.ceil(self.count / self.columns)

    def tile_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) of one tile for frames of width x height."""
        tile_w = min(self.tile_width, width)
        return tile_w, max(1, round(tile_w * height / width))

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(W, H) of the sheet for frames of width x height."""
        tile_w, tile_h = self.tile_size(width, height)
        sheet_w = self.columns * tile_w + (self.columns + 1) * self.gap
        grid_h = self.rows * tile_h + (self.rows + 1) * self.gap
        return sheet_w, grid_h + self.caption_lines * self.line_height + self.gap


def frame_count(video: str | Path) -> int:
    count, _ = imageio_ffmpeg.count_frames_and_secs(str(video))
    if count < 1:
        raise PreviewError(f"{video}: no frames")
    return count


def iter_frames(video: str | Path) -> Iterator[tuple[int, np.ndarray, dict]]:
    """(index, uint8 [H, W, 3] frame, metadata) for every frame, one at a time."""
    reader = imageio_ffmpeg.read_frames(str(video), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    for index, raw in enumerate(reader):
        yield index, np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3), meta


def evenly_spaced(total: int, count: int) -> list[int]:
    """`count` frame indices from first to last (fewer when the video is shorter)."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def pick_frames(video: str | Path, indices: list[int]) -> tuple[list[np.ndarray], dict]:
    wanted = set(indices)
    picked, meta = [], {}
    for index, frame, meta in iter_frames(video):
        if index in wanted:
            picked.append(frame.copy())
    if len(picked) != len(wanted):
        raise PreviewError(f"{video}: read {len(picked)} of the {len(wanted)} frames asked for")
    return picked, meta


def _font(size: int) -> ImageFont.ImageFont:
    for path in FONT_FILES:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def caption_lines(row_id: str, prompt: str, layout: SheetLayout, width: int) -> list[str]:
    """The row id, then the prompt wrapped into the lines left (the last one ends in '…' if cut)."""
    chars = max(10, int(width / (layout.line_height * 0.55)))
    wrapped = textwrap.wrap(" ".join(prompt.split()), chars) or [""]
    room = layout.caption_lines - 1
    if len(wrapped) > room:
        wrapped = wrapped[:room]
        wrapped[-1] = wrapped[-1][: chars - 1].rstrip() + "…"
    return [row_id, *wrapped]


def contact_sheet(
    video: str | Path, out: str | Path, row_id: str, prompt: str, layout: SheetLayout = SheetLayout()
) -> Path:
    """Write a PNG grid of `layout.count` evenly spaced frames with the id and prompt under it."""
    total = frame_count(video)
    frames, _ = pick_frames(video, evenly_spaced(total, layout.count))
    height, width = frames[0].shape[:2]
    sheet_w, sheet_h = layout.size(width, height)
    tile_w, tile_h = layout.tile_size(width, height)
    sheet = Image.new("RGB", (sheet_w, sheet_h), (24, 24, 24))
    for i, frame in enumerate(frames):
        tile = Image.fromarray(frame).resize((tile_w, tile_h), Image.Resampling.BILINEAR)
        col, row = i % layout.columns, i // layout.columns
        x = layout.gap + col * (tile_w + layout.gap)
        sheet.paste(tile, (x, layout.gap + row * (tile_h + layout.gap)))
    draw = ImageDraw.Draw(sheet)
    font = _font(layout.line_height - 3)
    top = layout.rows * tile_h + (layout.rows + 1) * layout.gap
    for n, text in enumerate(caption_lines(row_id, prompt, layout, sheet_w - 2 * layout.gap)):
        draw.text((layout.gap, top + n * layout.line_height), text, fill=(235, 235, 235), font=font)
    out = Path(out)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def batch_sheet(sheets: list[str | Path], out: str | Path) -> Path:
    """The per-row contact sheets stacked top to bottom (they share one width)."""
    images = [Image.open(p).convert("RGB") for p in sheets]
    if not images:
        raise PreviewError("no contact sheets to combine")
    width = max(im.width for im in images)
    combined = Image.new("RGB", (width, sum(im.height for im in images)), (24, 24, 24))
    top = 0
    for im in images:
        combined.paste(im, (0, top))
        top += im.height
    out = Path(out)
    with atomic_path(out) as tmp:
        combined.save(tmp, format="PNG")
    return out


def animated_preview(video: str | Path, out: str | Path, max_side: int = 192, max_frames: int = 24) -> Path:
    """A small looping GIF: at most `max_frames` frames, the longer side at most `max_side` px.

    Frames are skipped evenly and each shown longer, so the preview lasts as long as the video.
    """
    total = frame_count(video)
    indices = evenly_spaced(total, max_frames)
    frames, meta = pick_frames(video, indices)
    height, width = frames[0].shape[:2]
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    images = [Image.fromarray(f).resize(size, Image.Resampling.BILINEAR) for f in frames]
    fps = float(meta.get("fps") or 16)
    duration_ms = max(20, round(1000 * total / fps / len(images)))
    out = Path(out)
    with atomic_path(out) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return out


def make_previews(video: str | Path, sheet: str | Path, prompt_key: str, contact_sheet_out: str | Path,
                  animation_out: str | Path, row_id: str) -> None:
    """Both pictures of one row's video (one job: the mp4 is small, a job's start-up is not); the
    caption's prompt is read from the sheet by its key."""
    contact_sheet(video, contact_sheet_out, row_id, read_prompt(sheet, prompt_key))
    animated_preview(video, animation_out)
