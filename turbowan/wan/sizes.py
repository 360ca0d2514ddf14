"""Frame sizes and frame counts: the presets, adaptive sizing, and their rules.

docs/reference.md, "Sizes", has the preset table and the adaptive sizing formula.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

# W x H of each preset.
PRESETS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "1:1": (640, 640), "4:3": (640, 480), "3:4": (480, 640)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960), "4:3": (960, 720), "3:4": (720, 960)},
}
MAX_SIDE = 2048  # the DiT's RoPE tables end there
SIZE_MULTIPLE = 16  # VAE (8) x patch (2)
VAE_TIME_STRIDE = 4
VAE_SPACE_STRIDE = 8
VIDEO_KEYS = ("width", "height", "num_frames")


def video_values(video: Mapping[str, Any]) -> dict[str, int]:
    """A row's frame size and count as the stages record them."""
    return {k: int(video[k]) for k in VIDEO_KEYS}


def adaptive_size(resolution: str, aspect_ratio: str, image_width: int, image_height: int) -> tuple[int, int]:
    """Keep the preset's area, follow the image's aspect ratio, round each side to 16 (Python round)."""
    w, h = PRESETS[resolution][aspect_ratio]
    area = w * h
    ar = image_height / image_width
    height = round(math.sqrt(area * ar) / SIZE_MULTIPLE) * SIZE_MULTIPLE
    width = round(math.sqrt(area / ar) / SIZE_MULTIPLE) * SIZE_MULTIPLE
    return width, height


def choose_size(
    resolution: str,
    aspect_ratio: str,
    adaptive: bool,
    width: int | None,
    height: int | None,
    image_size: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The W x H of one row: explicit width/height, else adaptive from the image, else the preset."""
    if width is not None and height is not None:
        return int(width), int(height)
    if adaptive:
        if image_size is None:
            raise ValueError("adaptive sizing needs the image size")
        return adaptive_size(resolution, aspect_ratio, *image_size)
    return PRESETS[resolution][aspect_ratio]


def size_problem(width: int, height: int) -> str | None:
    """Why W x H cannot be used, or None."""
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % SIZE_MULTIPLE:
            return f"{name} {value} is not a positive multiple of {SIZE_MULTIPLE}"
        if value > MAX_SIDE:
            return f"{name} {value} is above {MAX_SIDE} px"
    return None


def frames_ok(num_frames: int) -> bool:
    return num_frames >= 1 and (num_frames - 1) % VAE_TIME_STRIDE == 0


def latent_shape(num_frames: int, width: int, height: int, channels: int = 16) -> tuple[int, int, int, int, int]:
    """[1, C, lat_t, lat_h, lat_w] of the sampler state for this video."""
    return (1, channels, 1 + (num_frames - 1) // VAE_TIME_STRIDE, height // VAE_SPACE_STRIDE, width // VAE_SPACE_STRIDE)
