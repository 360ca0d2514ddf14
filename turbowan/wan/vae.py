"""The VAE side of a row: image -> conditioning y, final latent -> frames.

docs/reference.md, "Conditioning": the VAE input, the latent constants, the mask and y's layout.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .sizes import VAE_TIME_STRIDE


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std, shaped [1, 16, 1, 1, 1], for normalising latents."""
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device)
    return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)


@torch.no_grad()
def encode_condition(vae, image: torch.Tensor, num_frames: int, last_image: torch.Tensor | None = None) -> torch.Tensor:
    """y = cat([mask, latent]) [1, 20, lat_t, lat_h, lat_w] in bfloat16.

    image (and last_image): [1, 3, h, w] in [-1, 1]. The VAE sees the image, then frames of zeros
    (mid-grey on the [-1, 1] scale), then last_image when given; the mask marks the given frames
    (condition_mask).
    """
    device, dtype = vae.device, vae.dtype
    _, _, h, w = image.shape
    # made on the VAE's device: at 720p the zero frames would be 0.9 GB in float32 on the host
    video = torch.zeros(1, 3, num_frames, h, w, device=device, dtype=dtype)  # [1, 3, F, h, w]
    video[:, :, 0] = image.to(device=device, dtype=dtype)
    if last_image is not None:
        video[:, :, -1] = last_image.to(device=device, dtype=dtype)
    mu = vae.encode(video).latent_dist.mean.float()
    mean, std = _latent_stats(vae, mu)
    latent = (mu - mean) / std  # [1, 16, lat_t, lat_h, lat_w]
    mask = condition_mask(num_frames, latent.shape[2:], last_image is not None).to(device)
    return torch.cat([mask, latent], dim=1).to(torch.bfloat16)


def condition_mask(num_frames: int, latent_size: Sequence[int], last: bool = False) -> torch.Tensor:
    """The mask half of y [1, 4, lat_t, lat_h, lat_w]: 1 where a frame was given (the first, and the
    last when `last`), in the VAE's time layout. Latent frame 0 stands for pixel frame 0 alone and
    every later latent frame for 4 pixel frames, so the first frame's flag is repeated 4 times and
    each latent frame's 4 channels hold its 4 pixel frames' flags: the first latent frame is 1 in
    every channel, a given last frame is 1 in the last channel of the last latent frame only."""
    lat_t, lat_h, lat_w = latent_size
    given = torch.zeros(num_frames)
    given[0] = 1
    if last:
        given[-1] = 1
    given = torch.cat([given[:1].repeat(VAE_TIME_STRIDE - 1), given])  # [VAE_TIME_STRIDE * lat_t]
    per_latent = given.view(lat_t, VAE_TIME_STRIDE).T  # [4, lat_t]
    return per_latent[None, :, :, None, None].expand(1, VAE_TIME_STRIDE, lat_t, lat_h, lat_w).contiguous()


@torch.no_grad()
def decode_frames(vae, x: torch.Tensor) -> torch.Tensor:
    """Final sampler state [1, 16, lat_t, lat_h, lat_w] -> frames uint8 [F, H, W, 3].

    Rounded to nearest, ties to even (torch.round); TurboDiffusion's writer rounds ties up
    (docs/reference.md, "Where this pipeline deliberately differs from TurboDiffusion's script").
    """
    latent = x.float().to(vae.device)
    mean, std = _latent_stats(vae, latent)
    video = vae.decode((latent * std + mean).to(vae.dtype)).sample.float()  # [1, 3, F, H, W]
    video = (video.clamp(-1, 1) + 1) / 2
    return (video[0] * 255).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()
