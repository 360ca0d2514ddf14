"""Key names: the official Wan / TurboDiffusion checkpoint layouts <-> diffusers / transformers.

The VAE's official -> diffusers direction reuses diffusers' own converter (it only renames keys,
so it is called on {name: name} and gives a rename table without touching any tensor; that is
what lets a loader stream tensors one by one). The DiT's is written here, so that an expert's
28 GB can start streaming before diffusers is imported; a test holds it equal to diffusers'
converter. The reverse directions write the demo models in the official layouts; tests check
that they are the exact inverses.
"""

from __future__ import annotations

import re
from typing import Iterable

from ..files.formats import SLA_KEY, clean_dit_key

# ---------------------------------------------------------------------------------------------
# DiT (TurboDiffusion's .pth: official Wan names, patch_embedding as a Linear, SLA proj_l extras)

# Where the SLA proj_l weights live on the diffusers side: a `sla` module beside attn1's projections.
SLA_MODULE = "attn1.sla"


def dit_rename_table(official_keys: Iterable[str]) -> dict[str, str]:
    """{diffusers key: official key} for the network weights, int8 (`int8_weight`, `scale`) and SLA
    (`blocks.N.attn1.sla.proj_l.*`) tensors included. Without importing diffusers (a test holds it
    equal to diffusers' converter), so that an expert's weights can stream while diffusers loads."""
    table = {}
    for original in official_keys:
        key = clean_dit_key(original)
        if m := SLA_KEY.match(key):
            table[f"blocks.{m[1]}.{SLA_MODULE}.proj_l.{m[2]}"] = original
        else:
            table[dit_key_to_diffusers(key)] = original
    return table


def dit_key_to_diffusers(key: str) -> str:
    """Official Wan key -> diffusers WanTransformer3DModel key (dit_key_to_official backwards)."""
    if key == "head.modulation":
        return "scale_shift_table"
    key = re.sub(r"^(blocks\.\d+)\.norm3\.", r"\1.norm2.", key)
    for new, old in reversed(_DIT_TO_OFFICIAL):
        key = key.replace(old, new)
    return key.replace(".modulation", ".scale_shift_table")


_DIT_TO_OFFICIAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
]


def dit_key_to_official(key: str) -> str:
    """diffusers WanTransformer3DModel key -> official Wan key (inverse of dit_rename_table)."""
    if key == "scale_shift_table":
        return "head.modulation"
    if m := re.match(rf"^blocks\.(\d+)\.{re.escape(SLA_MODULE)}\.proj_l\.(weight|bias)$", key):
        return f"blocks.{m[1]}.self_attn.attn_op.local_attn.proj_l.{m[2]}"
    key = key.replace(".scale_shift_table", ".modulation")
    for new, old in _DIT_TO_OFFICIAL:
        key = key.replace(new, old)
    # diffusers' norm2 is the official cross-attention norm3 (and diffusers has no norm3 weights).
    return re.sub(r"^(blocks\.\d+)\.norm2\.", r"\1.norm3.", key)


# ---------------------------------------------------------------------------------------------
# VAE (Wan2.1_VAE.pth and ComfyUI's wan_2.1_vae.safetensors share these names)


def vae_rename_table(official_keys: Iterable[str]) -> dict[str, str]:
    """{diffusers key: official key} for the Wan2.1 VAE."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers({k: k for k in official_keys})


_RESNET_TO_OFFICIAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}


def vae_key_to_official(key: str) -> str:
    """diffusers AutoencoderKLWan key -> official Wan VAE key (inverse of vae_rename_table)."""
    fixed = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    head, _, rest = key.partition(".")
    if head in fixed:
        return f"{fixed[head]}.{rest}"
    side = head  # encoder / decoder
    if rest.startswith("conv_in."):
        return f"{side}.conv1.{rest[len('conv_in.'):]}"
    if rest.startswith("norm_out."):
        return f"{side}.head.0.{rest[len('norm_out.'):]}"
    if rest.startswith("conv_out."):
        return f"{side}.head.2.{rest[len('conv_out.'):]}"
    m = re.match(r"mid_block\.resnets\.(\d)\.(.+)$", rest)
    if m:
        return f"{side}.middle.{2 * int(m[1])}.{_RESNET_TO_OFFICIAL[m[2]]}"
    m = re.match(r"mid_block\.attentions\.0\.(.+)$", rest)
    if m:
        return f"{side}.middle.1.{m[1]}"
    m = re.match(r"down_blocks\.(\d+)\.(.+)$", rest)
    if m:
        return f"{side}.downsamples.{m[1]}.{_RESNET_TO_OFFICIAL.get(m[2], m[2])}"
    m = re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)
    if m:
        return f"{side}.upsamples.{4 * int(m[1]) + int(m[2])}.{_RESNET_TO_OFFICIAL[m[3]]}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", rest)
    if m:
        return f"{side}.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise KeyError(f"no official name known for VAE key {key!r}")


# ---------------------------------------------------------------------------------------------
# umT5 encoder (models_t5_umt5-xxl-enc-bf16.pth) <-> transformers' UMT5EncoderModel

_T5_BLOCK_TO_HF = [
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
]


def t5_key_to_hf(key: str) -> str:
    """Official umT5 key -> transformers UMT5EncoderModel key."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = re.match(r"blocks\.(\d+)\.(.+)$", key)
    if m:
        for official, hf in _T5_BLOCK_TO_HF:
            if m[2] == official:
                return f"encoder.block.{m[1]}.{hf}"
    raise KeyError(f"not an umT5 encoder key: {key!r}")


def t5_key_to_official(key: str) -> str:
    """transformers UMT5EncoderModel key -> official umT5 key."""
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = re.match(r"encoder\.block\.(\d+)\.(.+)$", key)
    if m:
        for official, hf in _T5_BLOCK_TO_HF:
            if m[2] == hf:
                return f"blocks.{m[1]}.{official}"
    raise KeyError(f"not a UMT5EncoderModel key: {key!r}")
