"""Int8 experts (TurboDiffusion's `-quant.pth`): 128x128 blockwise int8 weights, on any machine.

Format (docs/reference.md, "The int8 format"): each Linear inside `blocks` (but SLA's proj_l) is
stored as `int8_weight` int8 [out, in], `scale` float32 [ceil(out/128), ceil(in/128)] and `bias`,
with
    W[i, j] ~ int8_weight[i, j] * scale[i // 128, j // 128].

Two ways to run them, swapped into diffusers' WanTransformer3DModel in place of nn.Linear:
- `turbodiffusion.ops.Int8Linear` (CUDA kernel, W8A8: it also quantises the activations per
  128x128 block) where the package is installed and the model is on a GPU;
- `BlockInt8Linear` here (plain torch, any device): dequantises the weight blockwise to the
  activation dtype at each call and runs a plain matmul (only the activations are not quantised,
  so it is slightly more accurate than the kernel; the two differ by the activation rounding).
Both hold the same buffers (int8_weight, scale, bias), so one state dict loads into either.
"""

from __future__ import annotations

import logging
import math
import re

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BLOCK = 128


def quantize_blockwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (int8 [out, in], float32 scale [ceil(out/128), ceil(in/128)]).

    scale = amax(|block|) / 128; int8 = round-half-even(W / scale) saturated to [-128, 127]
    (an all-zero block gets scale 0 and zeros).
    """
    out_f, in_f = weight.shape
    rows, cols = math.ceil(out_f / BLOCK), math.ceil(in_f / BLOCK)
    padded = F.pad(weight.float(), (0, cols * BLOCK - in_f, 0, rows * BLOCK - out_f))
    blocks = padded.view(rows, BLOCK, cols, BLOCK)  # [row block, i, col block, j]
    scale = blocks.abs().amax(dim=(1, 3)) / 128  # [rows, cols]
    per_element = _expand(scale, out_f, in_f)
    safe = torch.where(per_element > 0, per_element, torch.ones_like(per_element))
    q = torch.round(weight.float() / safe).clamp(-128, 127).to(torch.int8)
    return q, scale.contiguous()


def _expand(scale: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """scale [rows, cols] -> [out, in] with scale[i // 128, j // 128] at (i, j)."""
    return scale.repeat_interleave(BLOCK, 0)[:out_f].repeat_interleave(BLOCK, 1)[:, :in_f]


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [out, in] and scale [ceil(out/128), ceil(in/128)] -> W [out, in] in `dtype` (product in fp32)."""
    return (q.float() * _expand(scale.float(), *q.shape)).to(dtype)


class BlockInt8Linear(torch.nn.Module):
    """A Linear whose weight is stored blockwise int8; plain torch, so it runs on CPU too."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        blocks = (math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK))
        self.register_buffer("int8_weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(blocks, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_blockwise(self.int8_weight, self.scale, x.dtype)  # [out, in], one layer at a time
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blockwise int8"


# TurboDiffusion's int8 experts (official names): every Linear inside blocks but SLA's proj_l is
# int8; the q/k norms and norm3 are float32 (its FastRMSNorm / FastLayerNorm buffers).
INT8_LINEAR = re.compile(r"^blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.weight$|^blocks\.\d+\.ffn\.[02]\.weight$")
FLOAT32_NORM = re.compile(r"^blocks\.\d+\.(self_attn\.norm_[qk]\.weight|cross_attn\.norm_[qk]\.weight|norm3\.(weight|bias))$")


def quantize_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official-layout bf16 expert in TurboDiffusion's int8 format, as its quantising script writes
    it (for tests and benchmarks; users get the `-quant.pth` files). Tensors stay on their device."""
    out = {}
    for key, value in tensors.items():
        if INT8_LINEAR.match(key):
            layer = key[: -len(".weight")]
            out[f"{layer}.int8_weight"], out[f"{layer}.scale"] = quantize_blockwise(value.float())
        elif FLOAT32_NORM.match(key):
            out[key] = value.float()
        else:
            out[key] = value
    return out


def turbodiffusion_int8_linear():
    """turbodiffusion.ops.Int8Linear, or None when the package (or its compiled ops) is not importable."""
    try:
        from turbodiffusion.ops import Int8Linear
    except Exception as err:  # ImportError, or OSError from a compiled extension built for another torch
        log.debug("turbodiffusion.ops not importable: %s", err)
        return None
    return Int8Linear


def int8_backend(device: torch.device) -> str:
    """'turbodiffusion' (CUDA kernel) on a GPU with the package installed, else 'torch'."""
    return "turbodiffusion" if device.type == "cuda" and turbodiffusion_int8_linear() is not None else "torch"


def swap_in_int8_linears(model: torch.nn.Module, names: list[str], device: torch.device, dtype: torch.dtype,
                         kernels: bool = True) -> str:
    """Replace the nn.Linear modules `names` (diffusers module paths) by empty int8 linears; returns the backend.

    The new modules are made on the meta device: their buffers are filled by load_state_dict(assign=True).
    kernels=False keeps to the plain-torch BlockInt8Linear.
    """
    backend = int8_backend(device) if kernels else "torch"
    cls = turbodiffusion_int8_linear() if backend == "turbodiffusion" else BlockInt8Linear
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, expected nn.Linear")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=dtype)
        if backend == "turbodiffusion":  # its CUDA GEMM runs outside compiled graphs (turbowan.wan.compiled)
            new.forward = torch.compiler.disable(new.forward)
        setattr(parent, child, new)
    return backend
