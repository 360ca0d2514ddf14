"""The VAE side of a row: image -> conditioning y, final latent -> frames.

docs/reference.md, "Conditioning": the VAE input, the latent constants, the mask and y's layout.
"""

from __future__ import annotations

import torch


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std, shaped [1, 16, 1, 1, 1], for normalising latents."""
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device)
    return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)


@torch.no_grad()
def encode_condition(vae, image: torch.Tensor, num_frames: int) -> torch.Tensor:
    """y = cat([mask, latent]) [1, 20, lat_t, lat_h, lat_w] in bfloat16.

    image: [1, 3, h, w] in [-1, 1]. The VAE sees the image followed by num_frames-1 frames of
    zeros (mid-grey on the [-1, 1] scale); the mask marks the first latent frame as given.
    """
    device, dtype = vae.device, vae.dtype
    _, _, h, w = image.shape
    # made on the VAE's device: at 720p the zero frames would be 0.9 GB in float32 on the host
    video = torch.zeros(1, 3, num_frames, h, w, device=device, dtype=dtype)  # [1, 3, F, h, w]
    video[:, :, 0] = image.to(device=device, dtype=dtype)
    mu = vae.encode(video).latent_dist.mean.float()
    mean, std = _latent_stats(vae, mu)
    latent = (mu - mean) / std  # [1, 16, lat_t, lat_h, lat_w]
    mask = torch.zeros(1, 4, *latent.shape[2:], device=device)
    mask[:, :, 0] = 1
    return torch.cat([mask, latent], dim=1).to(torch.bfloat16)


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
