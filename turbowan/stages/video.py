"""encode_video: a row's frames -> its H.264 mp4, and the pictures of it. No torch here: with
`--cores 1` the mp4 jobs run one after another, and importing torch would be a second and more of each."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from ..files.artifacts import ArtifactError
from ..files.video import load_frames, write_mp4
from ..wan.sizes import video_values

log = logging.getLogger(__name__)


def encode_video(frames_dir: str, out: str, video: Mapping[str, Any], fps: int, quality: int) -> None:
    """Frames -> H.264 mp4 (yuv420p), checked for every frame once written."""
    video = video_values(video)
    files, info = load_frames(frames_dir)
    if (info["count"], info["width"], info["height"]) != (video["num_frames"], video["width"], video["height"]):
        raise ArtifactError(
            f"{frames_dir}: holds {info['count']} frames of {info['width']}x{info['height']}, "
            f"expected {video['num_frames']} of {video['width']}x{video['height']}"
        )
    write_mp4(files, out, video["width"], video["height"], int(fps), int(quality))
    log.info("wrote %s (%d frames at %d fps)", Path(out), video["num_frames"], fps)


def encode_video_and_pictures(frames_dir: str, out: str, video: Mapping[str, Any], fps: int, quality: int,
                              sheet: str, prompt_key: str, contact_sheet_out: str, animation_out: str,
                              row_id: str) -> None:
    """The rule encode_video: the mp4, then its pictures made from it (turbowan.report.previews)."""
    from ..report.previews import make_previews

    encode_video(frames_dir, out, video, fps, quality)
    make_previews(out, sheet, prompt_key, contact_sheet_out, animation_out, row_id)


def save_last_frame(frames_dir: str, out: str) -> None:
    """The rule save_last_frame: a row's last decoded frame as its own PNG, kept (the frames are
    temporary) for the rows that start or end on it (`@<id>` in their image cells)."""
    from PIL import Image

    from ..files.artifacts import atomic_path

    files, _ = load_frames(frames_dir)
    with Image.open(files[-1]) as frame, atomic_path(out) as tmp:
        frame.save(tmp, format="PNG")
    log.info("last frame of %s -> %s", frames_dir, out)


def join_chain(frames_dirs: list[str], continues: list[bool], out: str, fps: int, quality: int) -> None:
    """The rule join_chain: the frames of a chain's rows, in sheet order, as one H.264 mp4.

    continues[i]: row i starts from row i-1's last frame (its image is `@<that row>`), so its own first
    frame repeats that one and is left out; a row that does not is joined whole (a cut)."""
    if len(frames_dirs) != len(continues):
        raise ValueError(f"{len(frames_dirs)} frame folders but {len(continues)} continues flags")
    files: list[Path] = []
    size = None
    for frames_dir, joined in zip(frames_dirs, continues):
        row_files, info = load_frames(frames_dir)
        if size is None:
            size = (info["width"], info["height"])
        elif (info["width"], info["height"]) != size:
            raise ArtifactError(f"{frames_dir}: frames of {info['width']}x{info['height']}, but the chain's first "
                                f"row has {size[0]}x{size[1]}")
        files += row_files[1:] if joined and files else row_files
    write_mp4(files, out, size[0], size[1], int(fps), int(quality))
    log.info("wrote %s: %d frames of %d rows at %d fps", Path(out), len(files), len(frames_dirs), fps)
