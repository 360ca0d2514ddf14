"""LoRA files for the Wan DiT experts, told by their content (tensor names), never by their names.

Three layouts are common for Wan LoRAs:

- ``comfyui``: official Wan module names under ``diffusion_model.`` with ``lora_A`` / ``lora_B``
  (or ``lora_down`` / ``lora_up``), an optional ``.alpha`` per module, and full-weight deltas
  ``.diff`` / ``.diff_b`` for norms and biases (ComfyUI, ai-toolkit, lightx2v);
- ``diffusers``: diffusers' own names under ``transformer.`` (``attn1.to_q.lora_A.weight``), as
  diffusers / PEFT save them; alpha from the file's ``lora_adapter_metadata`` (else alpha = rank);
- ``kohya``: kohya / musubi-tuner's ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` with an
  ``.alpha`` per module.

`inspect_lora` reads a file's index only (names, dtypes, shapes, and its safetensors metadata): no
tensor data, no torch, so the workflow can check every LoRA a sheet names before any job runs.
Turning the names into the expert's (diffusers') module names, checking the shapes and merging
happen in turbowan.wan.lora.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .formats import CheckpointError, TensorInfo, inspect_model, read_index

LAYOUTS = ("comfyui", "diffusers", "kohya")
LAYOUT_WORDS = {
    "comfyui": "ComfyUI's (diffusion_model.blocks.N..., lora_A/lora_B)",
    "diffusers": "diffusers / PEFT (transformer.blocks.N..., lora_A/lora_B)",
    "kohya": "kohya / musubi-tuner (lora_unet_blocks_N_..., lora_down/lora_up)",
}
PAIR_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.")
DIFF_SUFFIXES = (".diff", ".diff_b")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY)

# Prefixes some trainers put in front of the layouts' own names.
_COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_DIFFUSERS_PREFIXES = ("base_model.model.", "transformer.")


class LoraError(CheckpointError):
    """A LoRA file is not one this pipeline can apply, or does not fit the expert."""


@dataclass
class LoraInfo:
    """A recognised LoRA file: its layout and its tensors' names in that layout's canonical form."""

    path: Path
    container: str  # "safetensors" or "pth"
    layout: str  # one of LAYOUTS
    # canonical name (diffusion_model.* / transformer.* / lora_unet_*) -> the file's own name
    names: dict[str, str] = field(repr=False)
    index: dict[str, TensorInfo] = field(repr=False)  # the file's own names
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)  # diffusers' lora_adapter_metadata

    def shape(self, canonical: str) -> tuple[int, ...]:
        return self.index[self.names[canonical]].shape

    def describe(self) -> str:
        pairs = sum(1 for k in self.names if ".lora_A." in k or ".lora_down." in k)
        ranks = sorted({self.shape(k)[0] for k in self.names if (".lora_A." in k or ".lora_down." in k)
                        and len(self.shape(k)) == 2})
        rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}" if ranks else "no pairs"
        return f"{self.layout} LoRA ({self.container}; {pairs} pairs, {rank})"


def _is_lora_key(key: str) -> bool:
    return any(m in key for m in PAIR_MARKERS) or key.endswith(DIFF_SUFFIXES + (".alpha",))


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy", backend="pread") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraError(f"{path}: its '{METADATA_KEY}' metadata is not valid JSON ({err})") from err
    return value if isinstance(value, dict) else {}


def _strip(key: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def _layout_of(path: Path, keys: list[str]) -> tuple[str, dict[str, str]]:
    """(layout, {canonical name: file name}), or LoraError naming the first key that fits none."""
    if all(k.startswith("lora_unet_") for k in keys):
        return "kohya", {k: k for k in keys}
    if any(k.startswith(("lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        first = next(k for k in keys if k.startswith("lora_te"))
        raise LoraError(f"{path}: tensor {first} belongs to a text encoder LoRA; this pipeline applies LoRAs to "
                        "the DiT experts only")
    for layout, prefixes, prefix in (("comfyui", _COMFY_PREFIXES, "diffusion_model."),
                                     ("diffusers", _DIFFUSERS_PREFIXES, "transformer.")):
        found = {k: rest for k in keys if (rest := _strip(k, prefixes)) is not None}
        if found:
            if len(found) != len(keys):
                first = next(k for k in keys if k not in found)
                raise LoraError(f"{path}: mixes layouts: tensor {first} has no {prefix} prefix like the others")
            return layout, {f"{prefix}{rest}": k for k, rest in found.items()}
    # No prefix at all: official Wan names (ComfyUI's without diffusion_model.) or diffusers' names.
    if any(".self_attn." in k or ".cross_attn." in k or ".ffn.0." in k or ".ffn.2." in k for k in keys):
        return "comfyui", {f"diffusion_model.{k}": k for k in keys}
    if any(".attn1." in k or ".attn2." in k or ".ffn.net." in k for k in keys):
        return "diffusers", {f"transformer.{k}": k for k in keys}
    raise LoraError(
        f"{path}: not a Wan LoRA in a layout this pipeline knows (tensor {keys[0]}); expected one of: "
        + "; ".join(LAYOUT_WORDS.values())
    )


def inspect_lora(path: str | os.PathLike) -> LoraInfo:
    """Recognise a LoRA file by its tensor names; LoraError naming the file when it is none we know."""
    path = Path(path)
    if not path.exists():
        raise LoraError(f"{path}: LoRA file not found")
    try:
        container, index = read_index(path)
    except CheckpointError as err:
        raise LoraError(str(err)) from None
    keys = list(index)
    if not keys:
        raise LoraError(f"{path}: holds no tensors; expected a LoRA")
    if not any(_is_lora_key(k) for k in keys):
        try:
            info = inspect_model(path, index, container)
        except CheckpointError:
            what = f"keys: {', '.join(keys[:3])}, ..."
        else:
            what = f"it is a whole model, {info.layout}"
        raise LoraError(f"{path}: not a LoRA ({what}); expected lora_A/lora_B or lora_down/lora_up pairs")
    if dora := next((k for k in keys if "dora_scale" in k), None):
        raise LoraError(f"{path}: a DoRA (tensor {dora}); DoRA's magnitude vectors cannot be merged as a LoRA is")
    layout, names = _layout_of(path, keys)
    not_lora = next((k for k in names if not _is_lora_key(k)), None)
    if not_lora is not None:
        raise LoraError(f"{path}: tensor {names[not_lora]} is neither a LoRA pair, an alpha nor a .diff delta")
    metadata = _safetensors_metadata(path) if container == "safetensors" else {}
    return LoraInfo(path, container, layout, names, dict(index), metadata)


def file_identity(path: str | os.PathLike) -> tuple[str, int, int, int]:
    """(real path, size, mtime, inode): what changes when the file is replaced or rewritten."""
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino


def lora_digest(path: str | os.PathLike) -> str:
    """sha256 of a LoRA file (hashed once per process and version of the file)."""
    return _digest(*file_identity(path))


@lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
