"""encode_image: a row's first frame (and last, when given) -> its conditioning y [1, 20, lat_t, lat_h, lat_w]
(mask + latent)."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from ..files.artifacts import save_artifact
from ..wan.image import open_rgb, preprocess
from ..wan.sizes import video_values
from ..wan.vae import encode_condition
from . import loading
from .context import StageContext

log = logging.getLogger(__name__)


def encode_image(image: str, vae: str, out: str, video: Mapping[str, Any], device: str = "auto",
                 vae_dtype: str = "auto", frugal: bool = False, last_image: str | None = None, *,
                 ctx: StageContext | None = None) -> None:
    """last_image: the picture the video ends on (resized and cropped as the first); None: a free end."""
    ctx = StageContext() if ctx is None else ctx
    video = video_values(video)
    first = preprocess(open_rgb(image), video["width"], video["height"])  # [1, 3, H, W]
    last = None if last_image is None else preprocess(open_rgb(last_image), video["width"], video["height"])
    y, params = loading.run_vae(ctx, vae, device, vae_dtype, video, frugal, "VAE encode",
                                lambda m: encode_condition(m, first, video["num_frames"], last))
    log.info("image %s%s -> y %s", image, "" if last_image is None else f", last image {last_image}", list(y.shape))
    ctx.check()
    inputs = {"image": image, "vae": vae}
    if last_image is not None:  # (named only when given: a row without keeps its record, byte for byte)
        inputs["last_image"] = last_image
    save_artifact(out, {"y": y}, stage="encode_image", params=params, inputs=inputs)
