"""decode: a row's final latent -> its frames, lossless PNG in a folder (the mp4 is made from them)."""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import torch

from ..files.artifacts import ArtifactError, fingerprint, load_artifact
from ..files.video import save_frames
from ..wan.sizes import latent_shape, video_values
from ..wan.vae import decode_frames
from . import loading
from .context import StageContext

log = logging.getLogger(__name__)


def decode(latent: str, vae: str, out: str, video: Mapping[str, Any], device: str = "auto",
           vae_dtype: str = "auto", frugal: bool = False, *, ctx: StageContext | None = None) -> None:
    ctx = StageContext() if ctx is None else ctx
    video = video_values(video)
    saved, _ = load_artifact(latent, "sample_low", {"x": (latent_shape(**video), torch.float64)}, params=video)
    frames, params = loading.run_vae(ctx, vae, device, vae_dtype, video, frugal, "VAE decode",
                                     lambda m: decode_frames(m, saved["x"]))  # uint8 [F, H, W, 3]
    expected = (video["num_frames"], video["height"], video["width"], 3)
    if tuple(frames.shape) != expected:
        raise ArtifactError(f"{latent}: decoded to {list(frames.shape)}, expected {list(expected)}")
    ctx.check()
    started = time.perf_counter()
    save_frames(frames, out, {"latent": fingerprint(latent), "vae": fingerprint(vae), "params": params})
    log.info("write frames: %.2f s", time.perf_counter() - started)
