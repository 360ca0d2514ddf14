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
