"""Input images: open safely, resize exactly as torchvision v2 does, normalise to [-1, 1]."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

# Refuse images above this many pixels (decompression bombs); 8K x 8K is plenty for a video frame.
MAX_PIXELS = 64 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    pass


@contextmanager
def _open(path: Path):
    """Image.open with our own pixel limit check instead of PIL's warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{path}: {img.width}x{img.height} is above the {MAX_PIXELS}-pixel limit")
            yield img


def open_rgb(path: str | Path) -> Image.Image:
    """An RGB PIL image, EXIF rotation applied; any mode (RGBA, L, I;16, CMYK, P) converted."""
    path = Path(path)
    try:
        with _open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit greyscale: scale to 8 bits instead of clipping
                img = img.point(lambda v: v / 256).convert("L")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return img.convert("RGB")
    except ImageError:
        raise
    except (OSError, Image.DecompressionBombError, ValueError) as err:
        raise ImageError(f"{path}: cannot be read as an image ({err})") from err


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation, reading only the header."""
    path = Path(path)
    try:
        with _open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    except ImageError:
        raise
    except (OSError, Image.DecompressionBombError, ValueError) as err:
        raise ImageError(f"{path}: cannot be read as an image ({err})") from err
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def preprocess(img: Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 3, height, width] float32 in [-1, 1].

    Bilinear with antialias on the uint8 image (stretch, no crop): bit-identical to torchvision
    v2's Resize, which the official script uses, without needing torchvision.
    """
    import torch  # (here: the gallery job opens images without torch)
    import torch.nn.functional as F

    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(img.height, img.width, 3).permute(2, 0, 1).contiguous()  # [3, H, W]
    resized = F.interpolate(
        pixels[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return resized.float().div(255).sub(0.5).div(0.5)
