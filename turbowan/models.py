"""Build the three networks from checkpoint files, streaming tensors straight to the device.

A loader opens a safetensors file, reads the network's sizes from the tensor shapes, builds the
diffusers / transformers module with empty (meta) parameters, then moves each tensor from the
file to the device one at a time: no whole-checkpoint copy in host memory, and only the model a
job asks for is ever loaded.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open

from .keymaps import SLA_KEY, clean_dit_key, dit_rename_table, t5_key_to_hf, vae_rename_table

log = logging.getLogger(__name__)

HEAD_DIM = 128  # every Wan2.x DiT uses 128-wide attention heads
TEXT_LEN = 512


class CheckpointError(ValueError):
    """A model file is not in a layout this pipeline knows."""


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors file, without reading the tensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def _stream_state_dict(
    path: Path, table: dict[str, str], device: torch.device, dtype_for: Callable[[str], torch.dtype]
) -> dict[str, torch.Tensor]:
    """{module key: tensor on device}, reading each tensor once, straight from the file."""
    state = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for new_key, file_key in table.items():
            tensor = f.get_tensor(file_key)
            state[new_key] = tensor.to(device=device, dtype=dtype_for(new_key), non_blocking=True)
    return state


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: does not fit the network; missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def _layer_count(shapes: dict[str, tuple[int, ...]], pattern: str) -> int:
    found = {int(m[1]) for k in shapes if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


# --------------------------------------------------------------------------- the DiT experts


def dit_config(shapes: dict[str, tuple[int, ...]], path: Path) -> dict:
    """diffusers WanTransformer3DModel config read off an official-layout expert's shapes."""
    shapes = {clean_dit_key(k): v for k, v in shapes.items()}
    if any(k.startswith("img_emb.") for k in shapes):
        raise CheckpointError(
            f"{path}: a Wan2.1 I2V DiT with CLIP image inputs (img_emb.*); this pipeline needs the "
            "Wan2.2 A14B high/low-noise experts"
        )
    needed = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
              "blocks.0.ffn.0.weight", "head.head.weight"]
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise CheckpointError(
            f"{path}: not a Wan DiT expert in the official layout (no {', '.join(missing)})"
        )
    patch = shapes["patch_embedding.weight"]
    dim = patch[0]
    in_channels = patch[1] // 4 if len(patch) == 2 else patch[1]
    if dim % HEAD_DIM:
        raise CheckpointError(f"{path}: model width {dim} is not a multiple of {HEAD_DIM}")
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=dim // HEAD_DIM,
        attention_head_dim=HEAD_DIM,
        in_channels=in_channels,
        out_channels=shapes["head.head.weight"][0] // 4,
        text_dim=shapes["text_embedding.0.weight"][1],
        freq_dim=shapes["time_embedding.0.weight"][1],
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        num_layers=_layer_count(shapes, r"blocks\.(\d+)\."),
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
    )


def load_transformer(path: str | Path, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """A Wan2.2 expert from an official-layout safetensors file, as diffusers' WanTransformer3DModel.

    Weights go to `dtype` except the modules diffusers keeps in float32 (time embedder, norms,
    modulation tables), which stay float32 as REFERENCE.md section 4 recommends.
    """
    from diffusers import WanTransformer3DModel

    path = Path(path)
    started = time.perf_counter()
    shapes = tensor_shapes(path)
    config = dit_config(shapes, path)
    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel(**config)
    keep_fp32 = set(WanTransformer3DModel._keep_in_fp32_modules)

    def dtype_for(key: str) -> torch.dtype:
        return torch.float32 if keep_fp32 & set(key.split(".")) else dtype

    table = dit_rename_table(shapes)
    state = _stream_state_dict(path, table, device, dtype_for)
    patch = state["patch_embedding.weight"]
    if patch.dim() == 2:  # TurboDiffusion stores the patch embedding as a Linear [dim, in*1*2*2]
        state["patch_embedding.weight"] = patch.reshape(patch.shape[0], config["in_channels"], 1, 2, 2)
    _assign(model, state, path)
    model.to(device).eval().requires_grad_(False)
    sla = [k for k in shapes if SLA_KEY.match(clean_dit_key(k))]
    log.info(
        "loaded expert %s (%d layers, width %d%s) in %.1f s",
        path, config["num_layers"], config["num_attention_heads"] * HEAD_DIM,
        ", SLA weights present" if sla else "", time.perf_counter() - started,
    )
    return model


# --------------------------------------------------------------------------- the VAE


def vae_config(shapes: dict[str, tuple[int, ...]], path: Path) -> dict:
    if "encoder.conv1.weight" not in shapes or "conv1.weight" not in shapes:
        raise CheckpointError(f"{path}: not a Wan2.1 VAE in the official layout (no encoder.conv1 / conv1)")
    base_dim = shapes["encoder.conv1.weight"][0]
    z_dim = shapes["conv2.weight"][0]
    if len(shapes) != 194:
        raise CheckpointError(f"{path}: has {len(shapes)} tensors; a Wan2.1 VAE has 194")
    return dict(base_dim=base_dim, z_dim=z_dim)


def load_vae(path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
    """The Wan2.1 VAE as diffusers' AutoencoderKLWan (latent constants from its default config)."""
    from diffusers import AutoencoderKLWan

    path = Path(path)
    started = time.perf_counter()
    shapes = tensor_shapes(path)
    config = vae_config(shapes, path)
    with init_empty_weights(include_buffers=False):
        model = AutoencoderKLWan(**config)
    state = _stream_state_dict(path, vae_rename_table(shapes), device, lambda _: dtype)
    _assign(model, state, path)
    model.to(device).eval().requires_grad_(False)
    log.info("loaded VAE %s in %.1f s", path, time.perf_counter() - started)
    return model


# --------------------------------------------------------------------------- umT5 + tokenizer


def t5_config(shapes: dict[str, tuple[int, ...]], path: Path):
    from transformers import UMT5Config

    if "token_embedding.weight" not in shapes or "blocks.0.pos_embedding.embedding.weight" not in shapes:
        raise CheckpointError(
            f"{path}: not an umT5 encoder in the official layout (no token_embedding / per-layer "
            "pos_embedding); is it a CLIP or another text encoder?"
        )
    vocab, d_model = shapes["token_embedding.weight"]
    buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=shapes["blocks.0.attn.q.weight"][0] // heads,
        d_ff=shapes["blocks.0.ffn.fc1.weight"][0],
        num_layers=_layer_count(shapes, r"blocks\.(\d+)\."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )


def load_text_encoder(path: str | Path, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """The umT5-XXL encoder (official layout) as transformers' UMT5EncoderModel."""
    from transformers import UMT5EncoderModel

    path = Path(path)
    started = time.perf_counter()
    shapes = tensor_shapes(path)
    config = t5_config(shapes, path)
    with init_empty_weights(include_buffers=False):
        model = UMT5EncoderModel(config)
    table = {t5_key_to_hf(k): k for k in shapes}
    table["encoder.embed_tokens.weight"] = "token_embedding.weight"
    state = _stream_state_dict(path, table, device, lambda _: dtype)
    _assign(model, state, path)
    model.to(device).eval().requires_grad_(False)
    log.info("loaded text encoder %s in %.1f s", path, time.perf_counter() - started)
    return model


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: tokenizer folder not found (the google/umt5-xxl tokenizer files)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
