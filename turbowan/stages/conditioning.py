"""encode_image: a row's first frame -> its conditioning y [1, 20, lat_t, lat_h, lat_w] (mask + latent)."""

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
                 vae_dtype: str = "auto", frugal: bool = False, *, ctx: StageContext | None = None) -> None:
    ctx = StageContext() if ctx is None else ctx
    video = video_values(video)
    pixels = preprocess(open_rgb(image), video["width"], video["height"])  # [1, 3, H, W]
    y, params = loading.run_vae(ctx, vae, device, vae_dtype, video, frugal, "VAE encode",
                                lambda m: encode_condition(m, pixels, video["num_frames"]))
    log.info("image %s -> y %s", image, list(y.shape))
    ctx.check()
    save_artifact(out, {"y": y}, stage="encode_image", params=params, inputs={"image": image, "vae": vae})
