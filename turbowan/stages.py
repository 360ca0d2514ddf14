"""One function per pipeline stage: read artifacts, check them, compute, write the next artifact.

These are what the Snakemake scripts call; they take plain paths and values, so tests and other
drivers can call them without Snakemake.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from .artifacts import ArtifactError, check_made_from, fingerprint, load_artifact, save_artifact
from .devices import release, resolve_device, resolve_dtype
from .image import open_rgb, preprocess
from .models import load_text_encoder, load_tokenizer, load_transformer, load_vae
from .progress import phase
from .sampler import SamplerState, dit_velocity, initial_state, restore_generator, run_steps
from .schedule import num_high_steps, rcm_timesteps
from .sizes import latent_shape
from .text import TEXT_LEN, encode_text
from .vae import decode_frames, encode_condition
from .video import load_frames, save_frames, write_mp4

log = logging.getLogger(__name__)

# The per-row values that determine a row's sampling, recorded in its boundary and latent files.
SAMPLING_KEYS = ("seed", "num_steps", "sigma_max", "boundary", "ode")
VIDEO_KEYS = ("width", "height", "num_frames")


def _video(video: Mapping[str, Any]) -> dict[str, int]:
    return {k: int(video[k]) for k in VIDEO_KEYS}


def _sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "seed": int(sampling["seed"]),
        "num_steps": int(sampling["num_steps"]),
        "sigma_max": float(sampling["sigma_max"]),
        "boundary": float(sampling["boundary"]),
        "ode": bool(sampling["ode"]),
    }


def encode_prompt(
    prompt: str, text_encoder: str, tokenizer: str, out: str, device: str = "auto", dtype: str = "bfloat16"
) -> None:
    dev = resolve_device(device)
    with phase("load text encoder"):
        encoder = load_text_encoder(text_encoder, dev, resolve_dtype(dtype))
    with phase("encode prompt"):
        emb, length = encode_text(encoder, load_tokenizer(tokenizer), prompt, dev)
    del encoder
    gc.collect()
    release(dev)
    log.info("prompt encoded: %d tokens (of %d), embedding %s", length, TEXT_LEN, list(emb.shape))
    save_artifact(
        out,
        {"text": emb, "length": torch.tensor([length], dtype=torch.int64)},
        stage="encode_prompt",
        params={"prompt": prompt, "text_len": TEXT_LEN},
        inputs={"text_encoder": text_encoder, "tokenizer": tokenizer},
    )


def _load_vae(vae: str, dev: torch.device, vae_dtype: str, frugal: int):
    """The VAE in `vae_dtype` ('auto': bfloat16 on a GPU, float32 on a CPU, where bf16 convs are slow)."""
    if vae_dtype == "auto":
        vae_dtype = "bfloat16" if dev.type == "cuda" else "float32"
    with phase("load VAE"):
        model = load_vae(vae, dev, resolve_dtype(vae_dtype))
    if frugal:
        model.enable_tiling()
        log.info("retry %d: VAE tiling on, to use less memory than the failed attempt", frugal)
    return model


def encode_image(
    image: str, vae: str, out: str, video: Mapping[str, Any], device: str = "auto", vae_dtype: str = "auto",
    frugal: int = 0,
) -> None:
    video = _video(video)
    dev = resolve_device(device)
    pixels = preprocess(open_rgb(image), video["width"], video["height"])  # [1, 3, H, W]
    model = _load_vae(vae, dev, vae_dtype, frugal)
    with phase("VAE encode"):
        y = encode_condition(model, pixels, video["num_frames"])
    log.info("image %s -> y %s", image, list(y.shape))
    save_artifact(out, {"y": y}, stage="encode_image", params=video, inputs={"image": image, "vae": vae})


def _load_conditions(text: str, cond: str, video: dict[str, int], device: torch.device):
    """Text embedding [1, 512, D] and y [1, 20, lat_t, lat_h, lat_w], checked against this row."""
    _, _, lat_t, lat_h, lat_w = latent_shape(**video)
    text_t, _ = load_artifact(text, "encode_prompt", {"text": ((1, TEXT_LEN, None), torch.bfloat16)}, device=device)
    cond_t, _ = load_artifact(
        cond, "encode_image", {"y": ((1, 20, lat_t, lat_h, lat_w), torch.bfloat16)}, params=video, device=device
    )
    return text_t["text"], cond_t["y"]


def _check_text_width(model, text: torch.Tensor, text_path: str, expert: str) -> None:
    expected = model.config.text_dim
    if text.shape[-1] != expected:
        raise ArtifactError(
            f"{text_path}: text embedding is {text.shape[-1]} wide but expert {expert} expects {expected}; "
            "the text encoder does not belong to this model (Wan2.2 needs umT5-XXL, not CLIP)"
        )


def _run_expert(
    expert: str, name: str, state: SamplerState, t: torch.Tensor, stop: int, ode: bool,
    text: str, text_emb: torch.Tensor, y: torch.Tensor, dtype: str, attn: dict, dev: torch.device,
) -> SamplerState:
    """Load one expert and run the steps state.next_step .. stop-1 with it."""
    with phase("load expert"):
        model = load_transformer(expert, dev, resolve_dtype(dtype), **attn)
    _check_text_width(model, text_emb, text, expert)
    return run_steps(state, dit_velocity(model, text_emb, y, resolve_dtype(dtype)), t, stop, ode, name)


def sample_high(
    text: str, cond: str, expert: str, out: str, sampling: Mapping[str, Any], video: Mapping[str, Any],
    device: str = "auto", dtype: str = "bfloat16", attention: str = "auto", sla_topk: float = 0.1,
) -> None:
    """Start a row's sampling and run the high-noise steps; save x, the generator and the next step."""
    sampling, video = _sampling(sampling), _video(video)
    attn = {"attention": attention, "sla_topk": float(sla_topk)}
    dev = resolve_device(device)
    text_emb, y = _load_conditions(text, cond, video, dev)
    t = rcm_timesteps(sampling["num_steps"], sampling["sigma_max"])
    n_high = num_high_steps(t, sampling["boundary"])
    state = initial_state(latent_shape(**video), sampling["seed"], t, dev)
    if n_high:
        state = _run_expert(expert, "high", state, t, n_high, sampling["ode"], text, text_emb, y, dtype, attn, dev)
    with phase("save boundary"):
        save_artifact(
            out,
            {
                "x": state.x,  # float64 [1, 16, lat_t, lat_h, lat_w]
                "generator_state": state.generator.get_state(),
                "next_step": torch.tensor([state.next_step], dtype=torch.int64),
            },
            stage="sample_high",
            params={**sampling, **video, **attn, "device_type": dev.type},
            inputs={"text": text, "cond": cond, "expert": expert},
        )


def sample_low(
    text: str, cond: str, boundary: str, expert: str, out: str, sampling: Mapping[str, Any],
    video: Mapping[str, Any], device: str = "auto", dtype: str = "bfloat16", attention: str = "auto",
    sla_topk: float = 0.1,
) -> None:
    """Restore the state saved by sample_high and run the remaining (low-noise) steps."""
    sampling, video = _sampling(sampling), _video(video)
    attn = {"attention": attention, "sla_topk": float(sla_topk)}
    dev = resolve_device(device)
    shape = latent_shape(**video)
    saved, record = load_artifact(
        boundary, "sample_high",
        {"x": (shape, torch.float64), "generator_state": ((None,), torch.uint8), "next_step": ((1,), torch.int64)},
        params={**sampling, **video, "device_type": dev.type},
    )
    check_made_from(boundary, record, "text", text)
    check_made_from(boundary, record, "cond", cond)
    state = SamplerState(
        x=saved["x"].to(dev), generator=restore_generator(saved["generator_state"], dev),
        next_step=int(saved["next_step"].item()),
    )
    t = rcm_timesteps(sampling["num_steps"], sampling["sigma_max"])
    if state.next_step < sampling["num_steps"]:
        text_emb, y = _load_conditions(text, cond, video, dev)
        state = _run_expert(
            expert, "low", state, t, sampling["num_steps"], sampling["ode"], text, text_emb, y, dtype, attn, dev
        )
    else:
        log.info("all %d steps ran on the high-noise expert; the low-noise expert is not loaded", sampling["num_steps"])
    save_artifact(
        out, {"x": state.x}, stage="sample_low",
        params={**sampling, **video, **attn, "device_type": dev.type}, inputs={"boundary": boundary, "expert": expert},
    )


def decode(
    latent: str, vae: str, out_dir: str, video: Mapping[str, Any], device: str = "auto", vae_dtype: str = "auto",
    frugal: int = 0,
) -> None:
    video = _video(video)
    dev = resolve_device(device)
    shape = latent_shape(**video)
    saved, _ = load_artifact(latent, "sample_low", {"x": (shape, torch.float64)}, params=video)
    model = _load_vae(vae, dev, vae_dtype, frugal)
    with phase("VAE decode"):
        frames = decode_frames(model, saved["x"])  # uint8 [F, H, W, 3]
    expected = (video["num_frames"], video["height"], video["width"], 3)
    if tuple(frames.shape) != expected:
        raise ArtifactError(f"{latent}: decoded to {list(frames.shape)}, expected {list(expected)}")
    with phase("write frames"):
        save_frames(frames, out_dir, {"latent": fingerprint(latent)})


def encode_video(frames_dir: str, out: str, video: Mapping[str, Any], fps: int, quality: int) -> None:
    video = _video(video)
    files, info = load_frames(frames_dir)
    if (info["count"], info["width"], info["height"]) != (video["num_frames"], video["width"], video["height"]):
        raise ArtifactError(
            f"{frames_dir}: holds {info['count']} frames of {info['width']}x{info['height']}, "
            f"expected {video['num_frames']} of {video['width']}x{video['height']}"
        )
    write_mp4(files, out, video["width"], video["height"], fps, quality)
    log.info("wrote %s (%d frames at %d fps)", Path(out), len(files), fps)
