"""TurboDiffusion's GPU kernels against the plain-torch paths, at full per-layer sizes.

Run on a CUDA machine with the turbodiffusion package installed:
    pip install turbodiffusion --no-build-isolation --no-deps
    pytest -m gpu tests/test_gpu_kernels.py
These fail (they do not skip) when there is no GPU or the package does not import.
"""

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

L_TOKENS = 4680  # 3 x 30 x 52 latent patches: not a multiple of the 128 / 64 blocks
HEADS, HEAD_DIM, WIDTH, FFN = 40, 128, 5120, 13824


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def cuda():
    assert torch.cuda.is_available(), "these tests need a CUDA GPU"
    return torch.device("cuda")


@pytest.fixture(scope="module")
def turbo_sla():
    from turbowan.wan.attention import _turbodiffusion_sla

    sla = _turbodiffusion_sla()
    assert sla is not None, "turbodiffusion.SLA does not import (pip install turbodiffusion --no-build-isolation)"
    return sla


@pytest.fixture(scope="module")
def turbo_int8():
    from turbowan.wan.int8 import turbodiffusion_int8_linear

    cls = turbodiffusion_int8_linear()
    assert cls is not None, "turbodiffusion.ops does not import (the compiled turbo_diffusion_ops extension)"
    return cls


def _qkv(cuda, seed=0):
    g = torch.Generator(device=cuda).manual_seed(seed)
    return [torch.randn(1, L_TOKENS, HEADS, HEAD_DIM, generator=g, device=cuda, dtype=torch.bfloat16)
            for _ in range(3)]


def test_sla_block_choice_matches_the_kernels(cuda, turbo_sla):
    from turbodiffusion.SLA.utils import get_block_map

    from turbowan.wan.attention import sla_block_map

    q, k, _ = (t.transpose(1, 2).contiguous() for t in _qkv(cuda))
    _, lut, topk = get_block_map(q, k, topk_ratio=0.1, BLKQ=128, BLKK=64)
    ours = sla_block_map(q, k, 0.1)
    assert ours.shape == lut.shape and topk == int(0.1 * math.ceil(L_TOKENS / 64))
    same = (ours.sort(-1).values == lut.sort(-1).values).all(-1).float().mean().item()
    assert same > 0.99, same  # bf16 near-ties may swap a block or two


def test_triton_sla_matches_plain_torch_sla(cuda, turbo_sla):
    from turbowan.wan.attention import SparseLinearAttention

    kernel = turbo_sla.SparseLinearAttention(head_dim=HEAD_DIM, topk=0.1, BLKQ=128, BLKK=64)
    with_kernel = SparseLinearAttention(HEAD_DIM, 0.1, kernel=kernel).to(cuda)
    plain = SparseLinearAttention(HEAD_DIM, 0.1).to(cuda)
    g = torch.Generator(device=cuda).manual_seed(1)
    with torch.no_grad():
        with_kernel.proj_l.weight.copy_(torch.randn(HEAD_DIM, HEAD_DIM, generator=g, device=cuda) * 0.05)
        with_kernel.proj_l.bias.copy_(torch.randn(HEAD_DIM, generator=g, device=cuda) * 0.05)
        plain.proj_l.load_state_dict(with_kernel.proj_l.state_dict())
        q, k, v = _qkv(cuda, seed=2)
        out_kernel, out_plain = with_kernel(q, k, v), plain(q, k, v)
    assert out_kernel.shape == out_plain.shape == q.shape and out_kernel.dtype == torch.bfloat16
    assert torch.isfinite(out_kernel).all()
    rel = _rel(out_kernel, out_plain)
    assert rel < 1e-2, rel  # bf16 outputs; online vs two-pass softmax


def test_official_int8_quantiser_matches_ours(cuda, turbo_int8):
    from turbodiffusion.ops.core import int8_quant

    from turbowan.wan.int8 import quantize_blockwise

    w = torch.randn(FFN, WIDTH, device=cuda, dtype=torch.bfloat16) * 0.02
    q_ref, s_ref = int8_quant(w)
    q, s = quantize_blockwise(w)
    assert tuple(s_ref.shape) == tuple(s.shape) == (FFN // 128, WIDTH // 128)
    torch.testing.assert_close(s_ref.float(), s, rtol=1e-6, atol=0)
    diff = (q_ref.int() - q.int()).abs()
    assert diff.max().item() <= 1 and diff.float().mean().item() < 1e-3


@pytest.mark.parametrize("out_features, in_features", [(WIDTH, WIDTH), (FFN, WIDTH), (WIDTH, FFN)])
def test_int8_linear_kernel_matches_the_cpu_path(cuda, turbo_int8, out_features, in_features):
    from turbowan.wan.int8 import BlockInt8Linear, quantize_blockwise

    g = torch.Generator(device=cuda).manual_seed(3)
    w = torch.randn(out_features, in_features, generator=g, device=cuda) / math.sqrt(in_features)
    bias = torch.randn(out_features, generator=g, device=cuda).to(torch.bfloat16)
    q, scale = quantize_blockwise(w)
    state = {"int8_weight": q, "scale": scale, "bias": bias}
    kernel = turbo_int8(in_features, out_features, bias=True, dtype=torch.bfloat16).to(cuda)
    kernel.load_state_dict(state)
    plain = BlockInt8Linear(in_features, out_features, device=cuda)
    plain.load_state_dict(state)
    x = torch.randn(1, L_TOKENS, in_features, generator=g, device=cuda).to(torch.bfloat16)
    with torch.no_grad():
        out_kernel, out_plain = kernel(x), plain(x)
    assert out_kernel.shape == out_plain.shape == (1, L_TOKENS, out_features)
    rel = _rel(out_kernel, out_plain)
    # only the kernel's activation quantisation (per 128x128 block) differs: ~0.5-1% (BENCHMARKS.md, "Reference measurements")
    assert 0 < rel < 2.5e-2, rel


def test_gpu_expert_with_kernels_matches_plain_torch(cuda, turbo_sla, turbo_int8, demo_models, tmp_path):
    """The demo expert (SLA weights) and its int8 version, loaded on the GPU: kernels vs plain torch."""
    from safetensors.torch import load_file, save_file

    from tests.model_layouts import int8_tensors
    from turbowan.wan import models

    int8_path = tmp_path / "int8.safetensors"
    save_file(int8_tensors(load_file(demo_models["high"])), str(int8_path))
    g = torch.Generator(device=cuda).manual_seed(4)
    x = torch.randn(1, 36, 3, 64, 80, generator=g, device=cuda).to(torch.bfloat16)  # 3840 tokens: 60 key blocks
    text = torch.randn(1, 512, 32, generator=g, device=cuda).to(torch.bfloat16)

    def run(model):
        with torch.no_grad():
            return model(hidden_states=x, timestep=torch.tensor([900.0], device=cuda).to(torch.bfloat16),
                         encoder_hidden_states=text, return_dict=False)[0]

    for path in (demo_models["high"], int8_path):
        fast = models.load_transformer(path, cuda, attention="sla")
        assert fast.blocks[0].attn1.sla._kernel, "the Triton SLA kernel is not in use"
        if path == int8_path:
            assert type(fast.blocks[0].ffn.net[2]) is turbo_int8
        plain = models.load_transformer(path, cuda, attention="sla", kernels=False)
        assert not plain.blocks[0].attn1.sla._kernel
        if path == int8_path:
            assert type(plain.blocks[0].ffn.net[2]).__name__ == "BlockInt8Linear"
        out_fast, out_plain = run(fast), run(plain)
        rel = _rel(out_fast, out_plain)
        assert torch.isfinite(out_fast).all() and rel < 3e-2, (path, rel)
