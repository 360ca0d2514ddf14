"""The plain-torch SLA and int8 paths against straightforward references of the same formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from turbowan.wan import attention
from turbowan.wan.attention import (
    AttentionConfigError,
    SLAAttnProcessor,
    SparseLinearAttention,
    resolve_attention,
    sla_block_map,
)
from turbowan.wan.int8 import BlockInt8Linear, dequantize_blockwise, quantize_blockwise
from turbowan.wan.models import load_transformer

CPU = torch.device("cpu")


def dense_sla_reference(q, k, v, weight, bias, topk, blkq=128, blkk=64):
    """SLA written out densely in float64: a full L x L score matrix masked to the chosen blocks,
    plus the linear branch as an explicit L x L kernel. (B, L, H, D) in and out."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    B, H, L, D = q.shape
    k_centered = k - k.mean(dim=-2, keepdim=True)
    pooled_q = torch.stack([q[:, :, i:i + blkq].mean(-2) for i in range(0, L, blkq)], dim=-2)
    pooled_k = torch.stack([k_centered[:, :, j:j + blkk].mean(-2) for j in range(0, L, blkk)], dim=-2)
    score = pooled_q @ pooled_k.transpose(-1, -2)  # (B, H, Mq, Nk)
    n = max(1, int(topk * score.shape[-1]))
    chosen = score.topk(n, dim=-1).indices
    block_mask = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, chosen, True)
    mask = block_mask.repeat_interleave(blkq, -2)[..., :L, :].repeat_interleave(blkk, -1)[..., :L]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    o_s = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v
    kernel = torch.softmax(q, -1) @ torch.softmax(k, -1).transpose(-1, -2)  # phi(q_i) . phi(k_j)
    o_l = (kernel @ v) / (1e-5 + kernel.sum(-1, keepdim=True))
    o = o_s + o_l @ weight.double().T + bias.double()
    return o.transpose(1, 2), chosen


def _qkv(L, H=3, D=128, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, L, H, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def _sla(topk, dtype, seed=1):
    module = SparseLinearAttention(128, topk, compute_dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.proj_l.weight.copy_(torch.randn(128, 128, generator=g) * 0.05)
        module.proj_l.bias.copy_(torch.randn(128, generator=g) * 0.05)
    return module


@pytest.mark.parametrize("L, topk", [(300, 0.5), (700, 0.25), (64, 0.1)])
def test_sla_matches_dense_reference(L, topk, monkeypatch):
    monkeypatch.setattr(attention, "_CHUNK_ELEMENTS", 1 << 16)  # force several chunks of query blocks
    q, k, v = _qkv(L)
    module = _sla(topk, torch.float64)
    expected, chosen = dense_sla_reference(q, k, v, module.proj_l.weight, module.proj_l.bias, topk)
    got_blocks = sla_block_map(q.transpose(1, 2), k.transpose(1, 2), topk)
    assert torch.equal(got_blocks.sort(-1).values, chosen.sort(-1).values)
    n_blocks = math.ceil(L / 64)
    assert got_blocks.shape[-1] == max(1, int(topk * n_blocks)) < n_blocks or n_blocks == 1
    got = module(q, k, v)
    assert got.shape == q.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_sla_in_bf16_is_close_to_the_exact_formula():
    q, k, v = _qkv(500, dtype=torch.bfloat16)
    module = _sla(0.3, torch.bfloat16)
    expected, _ = dense_sla_reference(q, k, v, module.proj_l.weight, module.proj_l.bias, 0.3)
    got = module(q, k, v)
    assert got.dtype == torch.bfloat16
    rel = ((got.double() - expected).norm() / expected.norm()).item()
    assert rel < 1e-2, rel


def test_sla_with_every_block_and_zero_proj_l_is_plain_attention():
    q, k, v = _qkv(200)
    module = SparseLinearAttention(128, 1.0, compute_dtype=torch.float64)
    torch.nn.init.zeros_(module.proj_l.weight)
    torch.nn.init.zeros_(module.proj_l.bias)
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(module(q, k, v), sdpa, rtol=1e-12, atol=1e-12)
    # ... and topk < 1 really drops blocks
    module.topk = 0.5
    assert not torch.allclose(module(q, k, v), sdpa, atol=1e-3)


class _SDPACore(torch.nn.Module):
    def forward(self, q, k, v):  # (B, L, H, D)
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def test_sla_processor_keeps_diffusers_norms_and_rope(demo_models):
    """With plain attention as its core, the SLA processor gives diffusers' own output bit for bit:
    the q/k norms, RoPE and output projection around the core are diffusers'."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 36, 3, 4, 6, generator=g).to(torch.bfloat16)
    text = torch.randn(1, 512, 32, generator=g).to(torch.bfloat16)

    def run(model):
        with torch.no_grad():
            return model(hidden_states=x, timestep=torch.tensor([500.0]).to(torch.bfloat16),
                         encoder_hidden_states=text, return_dict=False)[0]

    model = load_transformer(demo_models["high"], CPU, attention="sdpa")
    reference = run(model)
    for block in model.blocks:
        block.attn1.sla = _SDPACore()
        block.attn1.set_processor(SLAAttnProcessor())
    assert torch.equal(run(model), reference)
    sla = load_transformer(demo_models["high"], CPU)  # auto: the demo experts carry SLA weights
    assert isinstance(sla.blocks[0].attn1.sla, SparseLinearAttention)
    assert not torch.allclose(run(sla), reference, atol=1e-2)  # the linear branch changes the output


def test_attention_choices(demo_models):
    assert resolve_attention("auto", True, CPU, "x") == ("sla", "plain torch SLA")
    assert resolve_attention("auto", False, CPU, "x") == ("sdpa", "SDPA")
    with pytest.raises(AttentionConfigError, match=r"plain.pth: attention 'sla' needs an SLA checkpoint"):
        resolve_attention("sla", False, CPU, "plain.pth")
    with pytest.raises(AttentionConfigError, match=r"sagesla needs a CUDA GPU .*SpargeAttn"):
        resolve_attention("sagesla", True, CPU, "x")


# --------------------------------------------------------------------------- int8


def _reference_dequant(q, scale):
    """W[i, j] = q[i, j] * scale[i // 128, j // 128], by explicit index arithmetic."""
    rows = torch.arange(q.shape[0])[:, None] // 128
    cols = torch.arange(q.shape[1])[None, :] // 128
    return q.float() * scale[rows, cols]


def test_blockwise_int8_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * torch.linspace(0.1, 3, 200)  # partial blocks on both sides
    w[:128, :128] = 0  # an all-zero block
    q, scale = quantize_blockwise(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and tuple(scale.shape) == (3, 2)
    assert scale[0, 0] == 0 and (q[:128, :128] == 0).all()
    deq = dequantize_blockwise(q, scale, torch.float32)
    assert torch.equal(deq, _reference_dequant(q, scale))
    # round to nearest: error at most half a step (scale = amax/128), but +amax saturates at 127 (one step)
    step = _reference_dequant(torch.ones_like(q), scale)
    error = (deq - w).abs()
    assert ((error <= step / 2 + 1e-6) | (q == 127)).all() and (error <= step + 1e-6).all()
    assert q.min() >= -128 and q.max() <= 127 and (q.abs() == 128).any()  # amax maps to +-128 -> saturates at 127


def test_int8_linear_equals_dequantise_then_matmul():
    g = torch.Generator().manual_seed(1)
    w, bias = torch.randn(300, 200, generator=g), torch.randn(300, generator=g)
    q, scale = quantize_blockwise(w)
    layer = BlockInt8Linear(200, 300, dtype=torch.bfloat16)
    layer.load_state_dict({"int8_weight": q, "scale": scale, "bias": bias.to(torch.bfloat16)})
    x = torch.randn(2, 50, 200, generator=g).to(torch.bfloat16)
    expected = F.linear(x, _reference_dequant(q, scale).to(torch.bfloat16), bias.to(torch.bfloat16))
    assert torch.equal(layer(x), expected)
    exact = F.linear(x.float(), w, bias)
    rel = ((layer(x).float() - exact).norm() / exact.norm()).item()
    assert rel < 1.5e-2, rel  # weight rounding (<= 1/256 of a block's amax) + bf16
