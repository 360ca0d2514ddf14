"""What a model file is, told by its content (tensor names, dtypes, shapes), never by its name.

Users arrive with TurboDiffusion / Wan `.pth` files, their int8 versions, and ComfyUI single-file
safetensors (docs/reference.md, "Checkpoint files"). `inspect_model` reads only a file's index
(names, dtypes, shapes; no tensor data), recognises the layout, reads the network sizes off the
shapes and checks that the file is complete. Anything else gets a `CheckpointError` that names
the file, says what it looks like, and what was expected. `check_model_set` then checks that the
files fit together (both experts of one size, the text encoder's width = the experts' text width,
the VAE's latent channels = the experts').
"""

from __future__ import annotations

import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # torch is imported where tensors are read: the Snakefile checks files without it
    import torch

HEAD_DIM = 128  # every Wan2.x DiT uses 128-wide attention heads
INT8_BLOCK = 128  # the int8 format's 128x128 weight blocks
VAE_TENSORS = 194  # tensors in the Wan2.1 VAE
LATENT_CHANNELS = 16  # Wan2.1 VAE latent channels
I2V_IN_CHANNELS = 2 * LATENT_CHANNELS + 4  # noise + (mask + image latent) = 36

# The roles a config names, and the kind of network each must be.
ROLE_KIND = {"high": "dit", "low": "dit", "vae": "vae", "text_encoder": "text_encoder"}
KIND_WORDS = {
    "dit": "a Wan2.2 I2V DiT expert",
    "vae": "the Wan2.1 VAE",
    "text_encoder": "the umT5-XXL text encoder",
}

# safetensors' dtype codes -> torch's names for the dtypes (torch.bfloat16 -> "bfloat16"; dtype_name)
SAFETENSORS_DTYPES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "U8": "uint8",
    "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class CheckpointError(ValueError):
    """A model file is not in a layout this pipeline knows, or does not fit the other files."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # torch's name for it: "bfloat16"
    shape: tuple[int, ...]


@dataclass
class ModelInfo:
    """A recognised model file: what it is and the sizes of the network it holds."""

    path: Path
    container: str  # "safetensors" or "pth"
    kind: str  # "dit", "vae" or "text_encoder"
    layout: str  # e.g. "wan-dit", "wan-dit-int8", "umt5-official", "umt5-hf", "umt5-hf-fp8-scaled"
    config: dict[str, Any] = field(default_factory=dict)
    int8_layers: frozenset[str] = frozenset()  # official layer names stored as int8 (DiT)
    sla: bool = False  # DiT carries SLA proj_l weights
    index: dict[str, TensorInfo] = field(default_factory=dict, repr=False)  # the file's own keys

    def describe(self) -> str:
        extras = []
        if self.int8_layers:
            extras.append(f"{len(self.int8_layers)} int8 linears")
        if self.sla:
            extras.append("SLA weights")
        sizes = ", ".join(f"{k} {v}" for k, v in self.config.items() if k in _SHOWN_SIZES)
        return f"{self.layout} ({self.container}; {sizes}{'; ' + ', '.join(extras) if extras else ''})"


_SHOWN_SIZES = ("dim", "num_layers", "in_channels", "text_dim", "d_model", "z_dim", "base_dim")


# --------------------------------------------------------------------------- reading an index


def container_of(path: str | Path) -> str:
    """'safetensors' or 'pth', from the file's first bytes (a .pth is a zip archive)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: model file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a model file (.safetensors or .pth)")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "pth"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: a legacy (pre-zip) PyTorch pickle; re-save it with a current torch.save, "
            "or give the .safetensors version"
        )
    raise CheckpointError(
        f"{path}: neither a safetensors file nor a PyTorch (.pth zip) checkpoint; is it truncated or "
        "another kind of file?"
    )


def load_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .pth checkpoint, memory-mapped (nothing is read until used; never unpickles code).

    Unwraps a {"state_dict": ...} / {"model": ...} wrapper; drops entries that are not tensors.
    """
    import torch

    path = Path(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint (truncated or damaged?): {err}"
        ) from err
    except Exception as err:  # weights_only refuses pickled code with an UnpicklingError
        raise CheckpointError(f"{path}: refused to load (not a plain state dict of tensors): {err}") from err
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and len(obj) <= 3:
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_index(path: str | Path) -> tuple[str, dict[str, TensorInfo]]:
    """(container, {name: dtype and shape}) without reading tensor data."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    container = container_of(path)
    if container == "pth":
        tensors = load_pth(path)
        return container, {k: TensorInfo(dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
    try:
        # (the header only: no torch, no data; pread: the file is not mapped either)
        with safe_open(str(path), framework="numpy", backend="pread") as f:
            index = {}
            for name in f.keys():
                piece = f.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {piece.get_dtype()}")
                index[name] = TensorInfo(dtype, tuple(piece.get_shape()))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a complete safetensors file (truncated or damaged?): {err}") from err
    return container, index


# --------------------------------------------------------------------------- recognising a file

_DIT_WRAPPERS = ("_checkpoint_wrapped_module.",)
_DIT_PREFIXES = ("net.", "model.diffusion_model.")


def clean_dit_key(key: str) -> str:
    """Strip the wrappers the official loader strips: `net.` (and ComfyUI's `model.diffusion_model.`)
    prefixes and `_checkpoint_wrapped_module.` pieces."""
    for piece in _DIT_WRAPPERS:
        key = key.replace(piece, "")
    for prefix in _DIT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


# HF CLIP, Wan2.1's open-clip XLM-RoBERTa CLIP, OpenAI CLIP
_CLIP_PREFIXES = ("text_model.", "vision_model.", "textual.", "visual.", "transformer.resblocks.")


def _known_wrong(keys: set[str]) -> str | None:
    """A sentence for files people often give by mistake, or None."""
    if any(k.startswith(_CLIP_PREFIXES) or ".transformer.resblocks." in k for k in keys):
        return "a CLIP model (text_model.* / textual.* / visual.* keys)"
    if any(".attn1.to_q." in k for k in keys) and any(k.startswith("condition_embedder.") for k in keys):
        return ("a Wan DiT in diffusers' layout (attn1.to_q, condition_embedder.*); give the single-file "
                "official / TurboDiffusion checkpoint instead")
    if any(k.startswith("img_emb.") for k in keys):
        return "a Wan2.1 I2V DiT with CLIP image inputs (img_emb.*)"
    return None


def _kind_of(cleaned: set[str]) -> str | None:
    if "patch_embedding.weight" in cleaned and any(k.startswith("blocks.") for k in cleaned):
        return "dit"
    if {"encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight"} <= cleaned:
        return "vae"
    if "token_embedding.weight" in cleaned and any(k.startswith("blocks.") for k in cleaned):
        return "text_encoder"
    if any(k.startswith("encoder.block.") for k in cleaned):
        return "text_encoder"
    return None


def inspect_model(path: str | Path, index: Mapping[str, TensorInfo] | None = None, container: str = "") -> ModelInfo:
    """Recognise a model file and read its network sizes; CheckpointError when it is none we know."""
    path = Path(path)
    if index is None:
        container, index = read_index(path)
    keys = set(index)
    wrong = _known_wrong({clean_dit_key(k) for k in keys})
    if wrong:
        raise CheckpointError(f"{path}: {wrong}; not one of the files this pipeline runs ({_expected_all()})")
    inspectors = {"dit": _inspect_dit, "vae": _inspect_vae, "text_encoder": _inspect_t5}
    kind = _kind_of({clean_dit_key(k) for k in keys})
    if kind in inspectors:
        info = inspectors[kind](path, container, index)
        info.index = dict(index)
        return info
    some = ", ".join(sorted(keys)[:4]) or "no tensors"
    raise CheckpointError(f"{path}: not a model this pipeline knows (keys: {some}, ...); expected {_expected_all()}")


def _expected_all() -> str:
    return ("a Wan2.2 I2V DiT expert (patch_embedding, blocks.N.self_attn.*), the Wan2.1 VAE "
            "(encoder.*, decoder.*, conv1, conv2) or the umT5-XXL encoder (token_embedding / encoder.block.*)")


def _layer_count(keys, pattern: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    if not found:
        return 0
    return max(found) + 1


def _check_blocks_complete(path: Path, index: Mapping[str, TensorInfo], prefix: str, what: str) -> int:
    """Every block `prefix N.` holds the same tensors (names, shapes) as block 0; returns the count."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.(.+)$")
    blocks: dict[int, dict[str, TensorInfo]] = {}
    for key, info in index.items():
        if m := pattern.match(key):
            blocks.setdefault(int(m[1]), {})[m[2]] = info
    count = max(blocks) + 1 if blocks else 0
    missing_blocks = [i for i in range(count) if i not in blocks]
    if missing_blocks:
        raise CheckpointError(f"{path}: incomplete {what}: blocks {missing_blocks[:5]} are missing (of {count})")
    first = blocks.get(0, {})
    for i in range(1, count):
        if blocks[i].keys() != first.keys():
            lacks = sorted(first.keys() - blocks[i].keys()) or sorted(blocks[i].keys() - first.keys())
            raise CheckpointError(f"{path}: incomplete {what}: block {i} differs from block 0 in {lacks[:3]}")
        for name, info in blocks[i].items():
            if info.shape != first[name].shape:
                raise CheckpointError(
                    f"{path}: inconsistent {what}: {prefix}{i}.{name} is {list(info.shape)}, "
                    f"block 0 has {list(first[name].shape)}"
                )
    return count


# --------------------------------------------------------------------------- the DiT experts

SLA_KEY = re.compile(r"^blocks\.(\d+)\.self_attn\.attn_op\.local_attn\.proj_l\.(weight|bias)$")
INT8_KEY = re.compile(r"^(blocks\.\d+\..+)\.int8_weight$")


def _weight_shape(index: Mapping[str, TensorInfo], layer: str) -> tuple[int, ...] | None:
    for suffix in (".weight", ".int8_weight"):
        if layer + suffix in index:
            return index[layer + suffix].shape
    return None


def _inspect_dit(path: Path, container: str, raw: Mapping[str, TensorInfo]) -> ModelInfo:
    index = {clean_dit_key(k): v for k, v in raw.items()}
    if len(index) != len(raw):
        raise CheckpointError(f"{path}: two tensors share a name once the net./wrapper prefixes are removed")
    needed = ["patch_embedding.weight", "text_embedding.0", "time_embedding.0", "head.head", "blocks.0.ffn.0",
              "blocks.0.self_attn.q", "blocks.0.cross_attn.k"]
    missing = [k for k in needed if k not in index and _weight_shape(index, k) is None]
    if missing:
        raise CheckpointError(f"{path}: incomplete Wan DiT expert (no {', '.join(missing)})")
    num_layers = _check_blocks_complete(path, index, "blocks.", "DiT")

    patch = index["patch_embedding.weight"].shape  # [dim, in*1*2*2] (Linear) or [dim, in, 1, 2, 2] (Conv3d)
    dim = patch[0]
    in_channels = patch[1] // 4 if len(patch) == 2 else patch[1]
    out_channels = _weight_shape(index, "head.head")[0] // 4
    text_dim = _weight_shape(index, "text_embedding.0")[1]
    if dim % HEAD_DIM:
        raise CheckpointError(f"{path}: DiT width {dim} is not a multiple of the {HEAD_DIM}-wide heads")
    if in_channels != I2V_IN_CHANNELS or out_channels != LATENT_CHANNELS:
        guess = {
            (16, 16): " (a text-to-video model such as Wan2.1 T2V 1.3B/14B)",
            (48, 48): " (Wan2.2 TI2V-5B, which uses the Wan2.2 VAE)",
        }.get((in_channels, out_channels), "")
        raise CheckpointError(
            f"{path}: a DiT with {in_channels} input / {out_channels} output channels{guess}; the Wan2.2 "
            f"A14B I2V experts take {I2V_IN_CHANNELS} ({LATENT_CHANNELS} noise + 4 mask + {LATENT_CHANNELS} "
            f"image latent) and give {LATENT_CHANNELS}"
        )
    for key, info in index.items():
        if key.endswith((".int8_weight", ".scale")) or SLA_KEY.match(key):
            continue
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} is {info.dtype}; expected bf16, fp16 or fp32")

    int8_layers = frozenset(m[1] for k in index if (m := INT8_KEY.match(k)))
    for layer in int8_layers:
        q, scale = index[layer + ".int8_weight"], index.get(layer + ".scale")
        blocks = tuple(math.ceil(n / INT8_BLOCK) for n in q.shape)
        if q.dtype != "int8" or scale is None or scale.dtype != "float32" or scale.shape != blocks:
            raise CheckpointError(
                f"{path}: {layer} is not in the int8 format: expected int8_weight int8 {list(q.shape)} and "
                f"scale float32 {list(blocks)} (one per 128x128 block), found "
                f"{q.dtype} and {None if scale is None else (scale.dtype, list(scale.shape))}"
            )
        if layer + ".weight" in index:
            raise CheckpointError(f"{path}: {layer} holds both a float weight and an int8_weight")

    sla_keys = [k for k in index if SLA_KEY.match(k)]
    if sla_keys:
        blocks_with_sla = {int(SLA_KEY.match(k)[1]) for k in sla_keys}
        if blocks_with_sla != set(range(num_layers)) or len(sla_keys) != 2 * num_layers:
            raise CheckpointError(f"{path}: SLA proj_l weights in only some blocks ({len(sla_keys)} tensors)")
        shape = index["blocks.0.self_attn.attn_op.local_attn.proj_l.weight"].shape
        if shape != (HEAD_DIM, HEAD_DIM):
            raise CheckpointError(f"{path}: SLA proj_l weight is {list(shape)}, expected [{HEAD_DIM}, {HEAD_DIM}]")
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=dim // HEAD_DIM,
        attention_head_dim=HEAD_DIM,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=text_dim,
        freq_dim=_weight_shape(index, "time_embedding.0")[1],
        ffn_dim=_weight_shape(index, "blocks.0.ffn.0")[0],
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
    )
    layout = "wan-dit-int8" if int8_layers else "wan-dit"
    return ModelInfo(path, container, "dit", layout, {**config, "dim": dim}, int8_layers, bool(sla_keys))


def dit_model_config(info: ModelInfo) -> dict[str, Any]:
    """The WanTransformer3DModel(**config) arguments of an inspected expert."""
    return {k: v for k, v in info.config.items() if k != "dim"}


# --------------------------------------------------------------------------- the VAE


def _inspect_vae(path: Path, container: str, index: Mapping[str, TensorInfo]) -> ModelInfo:
    z_dim = index["conv2.weight"].shape[0]
    base_dim = index["encoder.conv1.weight"].shape[0]
    if z_dim != LATENT_CHANNELS:
        raise CheckpointError(
            f"{path}: a VAE with {z_dim} latent channels (the Wan2.2 VAE of TI2V-5B has 48); the A14B experts "
            f"need the Wan2.1 VAE ({LATENT_CHANNELS} channels, Wan2.1_VAE.pth)"
        )
    if len(index) != VAE_TENSORS:
        raise CheckpointError(f"{path}: has {len(index)} tensors; the Wan2.1 VAE has {VAE_TENSORS} (truncated?)")
    for key, info in index.items():
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: VAE tensor {key} is {info.dtype}; expected bf16, fp16 or fp32")
    return ModelInfo(path, container, "vae", "wan2.1-vae", {"base_dim": base_dim, "z_dim": z_dim})


# --------------------------------------------------------------------------- umT5

HF_T5_BLOCK = "encoder.block."


def _inspect_t5(path: Path, container: str, index: Mapping[str, TensorInfo]) -> ModelInfo:
    if "token_embedding.weight" in index:
        return _inspect_t5_official(path, container, index)
    return _inspect_t5_hf(path, container, index)


def _t5_config(vocab: int, d_model: int, d_kv_total: int, d_ff: int, layers: int, buckets: int, heads: int) -> dict:
    return dict(
        vocab_size=vocab, d_model=d_model, d_kv=d_kv_total // heads, d_ff=d_ff, num_layers=layers,
        num_heads=heads, relative_attention_num_buckets=buckets,
    )


def _inspect_t5_official(path: Path, container: str, index: Mapping[str, TensorInfo]) -> ModelInfo:
    if "blocks.0.pos_embedding.embedding.weight" not in index:
        raise CheckpointError(f"{path}: an encoder without per-layer position embeddings; expected umT5-XXL")
    layers = _check_blocks_complete(path, index, "blocks.", "umT5 encoder")
    needed = ["norm.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight", "blocks.0.ffn.gate.0.weight"]
    if missing := [k for k in needed if k not in index]:
        raise CheckpointError(f"{path}: incomplete umT5 encoder (no {', '.join(missing)})")
    vocab, d_model = index["token_embedding.weight"].shape
    buckets, heads = index["blocks.0.pos_embedding.embedding.weight"].shape
    config = _t5_config(vocab, d_model, index["blocks.0.attn.q.weight"].shape[0],
                        index["blocks.0.ffn.fc1.weight"].shape[0], layers, buckets, heads)
    return ModelInfo(path, container, "text_encoder", "umt5-official", config)


def _t5_ignored(key: str) -> bool:
    """Tensors of an HF / ComfyUI T5 file the encoder does not use: the decoder, the LM head, and
    ComfyUI's fp8 marker (`scaled_fp8`) and activation scales (`*.scale_input`)."""
    return key.startswith(("decoder.", "lm_head.")) or key == "scaled_fp8" or key.endswith(".scale_input")


def _inspect_t5_hf(path: Path, container: str, index: Mapping[str, TensorInfo]) -> ModelInfo:
    encoder = {k: v for k, v in index.items() if not _t5_ignored(k)}
    attn = "encoder.block.{}.layer.0.SelfAttention."
    layers = _layer_count(encoder, r"encoder\.block\.(\d+)\.")
    has_bias = [i for i in range(layers) if attn.format(i) + "relative_attention_bias.weight" in encoder]
    if has_bias == [0] and layers > 1:
        raise CheckpointError(
            f"{path}: a T5 encoder (position bias only in block 0, e.g. t5-v1_1-xxl), not umT5; Wan needs "
            "umT5-XXL (a position bias in every block)"
        )
    layers = _check_blocks_complete(path, encoder, HF_T5_BLOCK, "T5 encoder")
    embed = encoder.get("shared.weight") or encoder.get("encoder.embed_tokens.weight")
    needed = [attn.format(0) + "q.weight", "encoder.final_layer_norm.weight",
              "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"]
    if missing := [k for k in needed if k not in encoder]:
        raise CheckpointError(f"{path}: incomplete umT5 encoder (no {', '.join(missing)})")
    if embed is None or not has_bias:
        raise CheckpointError(f"{path}: incomplete umT5 encoder (no shared / embed_tokens or position bias)")
    fp8 = sorted(k for k, v in encoder.items() if v.dtype in FP8_DTYPES)
    for key in fp8:
        scale = encoder.get(key[: -len("weight")] + "scale_weight")
        if not key.endswith(".weight") or scale is None or math.prod(scale.shape) != 1:
            raise CheckpointError(
                f"{path}: {key} is {encoder[key].dtype} without a one-element `scale_weight` beside it; "
                "expected ComfyUI's fp8-scaled layout (W = weight * scale_weight)"
            )
    vocab, d_model = embed.shape
    buckets, heads = encoder[attn.format(0) + "relative_attention_bias.weight"].shape
    config = _t5_config(vocab, d_model, encoder[attn.format(0) + "q.weight"].shape[0],
                        encoder["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0], layers, buckets, heads)
    return ModelInfo(path, container, "text_encoder", "umt5-hf-fp8-scaled" if fp8 else "umt5-hf", config)


# --------------------------------------------------------------------------- roles and the whole set


def check_role(info: ModelInfo, role: str) -> ModelInfo:
    """The file named for `role` (high, low, vae, text_encoder) is that kind of network."""
    kind = ROLE_KIND[role]
    if info.kind != kind:
        raise CheckpointError(
            f"{info.path}: is {KIND_WORDS[info.kind]} ({info.layout}), but models.{role} must be {KIND_WORDS[kind]}"
        )
    return info


def inspect_role(path: str | Path, role: str) -> ModelInfo:
    return check_role(inspect_model(path), role)


def check_model_set(infos: Mapping[str, ModelInfo]) -> list[str]:
    """Mismatches between the files of one run (roles that are absent are skipped)."""
    problems = []
    high, low = infos.get("high"), infos.get("low")
    sizes = ("dim", "num_layers", "ffn_dim", "text_dim", "freq_dim", "in_channels", "out_channels")
    if high and low:
        differ = [f"{k} {high.config[k]} vs {low.config[k]}" for k in sizes if high.config[k] != low.config[k]]
        if differ:
            problems.append(
                f"models.high ({high.path}) and models.low ({low.path}) are experts of different sizes: "
                + ", ".join(differ)
            )
    text = infos.get("text_encoder")
    for role in ("high", "low"):
        expert = infos.get(role)
        if expert and text and expert.config["text_dim"] != text.config["d_model"]:
            problems.append(
                f"models.text_encoder ({text.path}) gives {text.config['d_model']}-wide embeddings, but "
                f"models.{role} ({expert.path}) expects text_dim {expert.config['text_dim']}"
            )
        vae = infos.get("vae")
        if expert and vae and expert.config["out_channels"] != vae.config["z_dim"]:
            problems.append(
                f"models.vae ({vae.path}) has {vae.config['z_dim']} latent channels, but models.{role} "
                f"({expert.path}) works on {expert.config['out_channels']}"
            )
    return problems
