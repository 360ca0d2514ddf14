"""Each stage's models, through the context's cache: loaded once, kept for the next row."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import torch

from ..progress import phase
from ..wan.compiled import compile_wanted
from ..wan.devices import resolve_device, resolve_dtype
from ..wan.models import load_text_encoder, load_tokenizer, load_transformer, load_vae
from .context import StageContext, file_key

log = logging.getLogger(__name__)

# GPU memory the VAE needs per output pixel of one frame (bf16, measured: BENCHMARKS.md); used to
# turn tiling on before a row runs out of memory rather than after. Compared with the card's total
# memory, not its free memory, so the choice does not depend on what else a worker holds.
VAE_BYTES_PER_PIXEL = 11_000


def text_encoder(ctx: StageContext, path: str, tokenizer: str, device: torch.device, dtype: str):
    """(umT5 encoder, tokenizer)"""
    def load():
        with phase("load text encoder"):
            return load_text_encoder(path, device, resolve_dtype(dtype)), load_tokenizer(tokenizer)

    key = ("text encoder", *file_key(path), os.path.realpath(tokenizer), dtype, str(device))
    return ctx.models.get(key, load, device, os.path.getsize(path))


def vae(ctx: StageContext, path: str, device: torch.device, vae_dtype: str):
    """The VAE in `vae_dtype` ('auto': bfloat16 on a GPU, float32 on a CPU, where bf16 convs are slow)."""
    if vae_dtype == "auto":
        vae_dtype = "bfloat16" if device.type == "cuda" else "float32"

    def load():
        with phase("load VAE"):
            return load_vae(path, device, resolve_dtype(vae_dtype))

    key = ("VAE", *file_key(path), vae_dtype, str(device))
    return ctx.models.get(key, load, device, os.path.getsize(path)), key


def expert(ctx: StageContext, path: str, device: torch.device, dtype: str, attention: str, sla_topk: float,
           activation_slices: int | str, compile: bool | str, loras: Sequence[tuple[str, float]] = ()):
    """A DiT expert as its job asked for it (attention, slices and compile are part of the key), with
    `loras` ((file, scale), scale 0 left out) merged into its weights. The key holds each LoRA file's
    identity and scale, so a row never gets another row's merge; and one merge of an expert stays
    resident at a time: loading another (or the plain expert) first drops the others."""
    options = dict(attention=attention, sla_topk=float(sla_topk), compile=compile_wanted(compile, device),
                   activation_slices=activation_slices)
    loras = [(lora, float(scale)) for lora, scale in loras if float(scale) != 0]

    def load():
        with phase("load expert"):
            return load_transformer(path, device, resolve_dtype(dtype), **options, loras=loras)

    plain = ("expert", *file_key(path), dtype, str(device), *sorted(options.items()))
    key = (*plain, ("loras", tuple((*file_key(lora), scale) for lora, scale in loras))) if loras else plain
    # (a plain key is a prefix of its merges' keys)
    ctx.models.evict_where(lambda k: k != key and isinstance(k, tuple) and k[: len(plain)] == plain, device)
    return ctx.models.get(key, load, device, os.path.getsize(path))


def tiling_wanted(device: torch.device, width: int, height: int, frugal: bool) -> bool:
    """Tile when asked to save memory (a retry), or when the frame size needs more than the card has."""
    if frugal:
        return True
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return VAE_BYTES_PER_PIXEL * width * height > 0.5 * total


def run_vae(ctx: StageContext, path: str, device: str, vae_dtype: str, video: dict[str, int], frugal: bool,
            what: str, work: Callable[[Any], Any]) -> tuple[Any, dict[str, Any]]:
    """(work(vae), the parameters the row's artifact records): the row's VAE stage, timed as `what`,
    tiled when memory needs it; after running out of GPU memory, once more with tiling and every
    other resident model out of the way."""
    dev = resolve_device(device)
    model, key = vae(ctx, path, dev, vae_dtype)
    params = {**video, "vae_dtype": vae_dtype, "device_type": dev.type}
    tiled = tiling_wanted(dev, video["width"], video["height"], frugal)
    (model.enable_tiling if tiled else model.disable_tiling)()
    if tiled:
        log.info("VAE tiling on (%s)", "a retry, to use less memory" if frugal else "the frame size needs it")
    with phase(what):
        try:
            return work(model), params
        except torch.OutOfMemoryError:
            if tiled:
                raise
            log.warning("out of GPU memory; once more with VAE tiling on and other models unloaded")
        ctx.models.evict_all_but(key, dev)
        model.enable_tiling()
        return work(model), params
