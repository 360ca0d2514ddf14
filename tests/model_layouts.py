"""Tiny models written in each real checkpoint layout (names, shape patterns, dtypes), for the tests.

From one set of weights: the expert as bf16 safetensors / TurboDiffusion .pth (net. and
_checkpoint_wrapped_module. wrappers) / int8 .pth (int8_weight, float32 scale, bias); the umT5
encoder with official names, HF names, and ComfyUI's fp8-scaled HF names (float8_e4m3fn weights
with a float32 scale_weight each, a `scaled_fp8` marker); the VAE as .pth and safetensors.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from turbowan.demo import write_official_pth
from turbowan.wan.int8 import quantize_expert as int8_tensors
from turbowan.wan.keymaps import t5_key_to_hf

def hf_t5_tensors(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """umT5 official names -> transformers names (shared.weight and encoder.embed_tokens.weight both)."""
    out = {t5_key_to_hf(k): v for k, v in official.items()}
    out["encoder.embed_tokens.weight"] = out["shared.weight"].clone()
    return out


def fp8_scaled_tensors(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8-scaled umT5: Linear weights float8_e4m3fn, W = weight * scale_weight (float32)."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in hf.items():
        if re.search(r"\.(q|k|v|o|wi_0|wi_1|wo)\.weight$", key):
            scale = value.float().abs().amax() / 448.0  # e4m3fn's largest value
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        elif key != "encoder.embed_tokens.weight":  # ComfyUI files keep only `shared`
            out[key] = value
    return out


def write_layouts(demo: dict[str, str], folder: Path) -> dict[str, str]:
    """Every layout of the demo models' weights, as files in `folder`; name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}

    def put(name: str, tensors: dict[str, torch.Tensor]) -> None:
        paths[name] = str(folder / name)
        if name.endswith(".pth"):
            torch.save(tensors, paths[name])
        else:
            save_file(tensors, paths[name])

    paths["dit.safetensors"] = demo["high"]
    write_official_pth(demo["high"], folder / "dit.pth")
    paths["dit.pth"] = str(folder / "dit.pth")
    dit = load_file(demo["high"])
    put("dit-int8.safetensors", int8_tensors(dit))
    write_official_pth(paths["dit-int8.safetensors"], folder / "dit-int8.pth")
    paths["dit-int8.pth"] = str(folder / "dit-int8.pth")

    t5 = load_file(demo["text_encoder"])
    paths["t5.safetensors"] = demo["text_encoder"]
    put("t5.pth", t5)
    put("t5-hf.safetensors", hf_t5_tensors(t5))
    put("t5-fp8.safetensors", fp8_scaled_tensors(hf_t5_tensors(t5)))

    paths["vae.safetensors"] = demo["vae"]
    put("vae.pth", load_file(demo["vae"]))
    return paths
