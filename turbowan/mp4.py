"""The encode_video stage: a row's frames -> its H.264 mp4, through the store.

Without torch: with `--cores 1` the mp4 jobs run one after another, and importing torch would be
a second and a half of each. The decode job also uses `mp4_into_store` to make mp4s ahead.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

from .files.artifacts import ArtifactError, failure_record, failure_words
from .batch import RowTask, run_group, store_entry
from .wan.sizes import video_values
from .files.video import FRAMES_INFO, load_frames, write_mp4

log = logging.getLogger(__name__)


def mp4_task(frames_dir: str, out: str, video: dict[str, int], fps: int, quality: int, key: str) -> RowTask:
    # the frames' record names the decode that made them (latent, VAE, dtype): it stands for their content
    return RowTask(key, out, {**video, "fps": int(fps), "quality": int(quality)},
                   {"frames": str(Path(frames_dir) / FRAMES_INFO)})


def _write_mp4_of(frames_dir: str, path: Path, video: dict[str, int], fps: int, quality: int) -> None:
    files, info = load_frames(frames_dir)
    if (info["count"], info["width"], info["height"]) != (video["num_frames"], video["width"], video["height"]):
        raise ArtifactError(
            f"{frames_dir}: holds {info['count']} frames of {info['width']}x{info['height']}, "
            f"expected {video['num_frames']} of {video['width']}x{video['height']}"
        )
    write_mp4(files, path, video["width"], video["height"], fps, quality)


def mp4_into_store(frames_dir: str, video: dict[str, int], fps: int, quality: int, store: str) -> None:
    """The mp4 encode_video will want for these frames, made ahead into the store (decode_latents).
    Best effort: on any error the encode_video job makes it itself."""
    try:
        entry = store_entry(store, "encode_video", mp4_task(frames_dir, "", video, fps, quality, ""))
        if entry.exists():
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        _write_mp4_of(frames_dir, entry, video, fps, quality)
        log.info("mp4 of %s made ahead, beside the decoding, in %.1f s", frames_dir, time.perf_counter() - started)
    except Exception as err:  # noqa: BLE001 - the encode_video job will do it
        log.warning("could not make the mp4 of %s ahead (%s); its encode_video job will", frames_dir, err)


def encode_video(
    frames_dir: str, out: str, video: Mapping[str, Any], fps: int, quality: int, key: str = "video",
    store: str | None = None,
) -> None:
    """Frames -> H.264 mp4. Through the store, so that a row whose frames were made again by its
    group's decode job (same latent, same VAE) gets its finished mp4 back instead of a new encode."""
    video = video_values(video)
    failed = failure_record(frames_dir)
    if failed:  # the row failed earlier in its group: this, its last stage, fails with that error
        raise ArtifactError(f"{failure_words(failed)}: {failed['error']}")

    def compute(task: RowTask, path: Path) -> None:
        _write_mp4_of(frames_dir, path, video, fps, quality)
        log.info("wrote %s (%d frames at %d fps)", Path(out), video["num_frames"], fps)

    run_group("encode_video", [mp4_task(frames_dir, out, video, fps, quality, key)], compute, store, None)
