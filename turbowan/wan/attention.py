"""Self-attention of the experts: SLA (sparse-linear attention), SageSLA, or plain SDPA.

TurboDiffusion's experts were fine-tuned with SLA (arXiv 2509.24006): per head, the output is

    o = o_s + proj_l(o_l)
    o_s = softmax attention of each 128-query block over its top-k 64-key blocks only
    o_l = phi(q) (phi(k)^T v) / (1e-5 + phi(q) . sum_j phi(k_j)),   phi = softmax over the head dim

where a query block's key blocks are ranked by (mean of its queries) . (mean of the key block,
after subtracting the mean key), and k = max(1, int(topk * number of key blocks)). `proj_l`
(a trained [128, 128] Linear per block) is in the checkpoints. Everything after the block choice
runs in bf16 (the softmax part accumulates in fp32), as the kernel does.

On a GPU with the `turbodiffusion` package the Triton kernel (`turbodiffusion.SLA`) runs; elsewhere
`SparseLinearAttention` below computes the same formula in plain torch, block-sparse (it only
touches the chosen key blocks). The one deliberate difference: with fewer than 1/topk key blocks
the kernel would choose 0 blocks and return NaN; here at least one block is chosen, and on a GPU
such inputs take the plain-torch path (only tiny videos, like the demo's, have so few tokens:
real ones have thousands of key blocks).

SLA replaces only self-attention's core (attn1, after the q/k RMS norms and RoPE); cross-attention
stays plain. `sdpa` on an SLA checkpoint drops the linear branch (proj_l unused): not the network
the checkpoint was trained as.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F

from .keymaps import SLA_MODULE

log = logging.getLogger(__name__)

BLKQ, BLKK = 128, 64  # TurboDiffusion's SLA block sizes (queries, keys)
ATTENTION_MODES = ("auto", "sla", "sagesla", "sdpa")
_CHUNK_ELEMENTS = 1 << 25  # score elements per chunk of query blocks (128 MiB in fp32)


class AttentionConfigError(ValueError):
    """The configured attention cannot run with this checkpoint or on this machine."""


# --------------------------------------------------------------------------- the formula, plain torch


def _mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, ceil(L/block), D): mean of each block (a short last block over its own rows)."""
    B, H, L, D = x.shape
    n = math.ceil(L / block)
    sums = F.pad(x.float(), (0, 0, 0, n * block - L)).view(B, H, n, block, D).sum(dim=3)
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = L - (n - 1) * block
    return (sums / counts[:, None]).to(x.dtype)


def sla_block_map(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int = BLKQ, blkk: int = BLKK) -> torch.Tensor:
    """Top-k key blocks of every query block: int64 (B, H, ceil(L/blkq), n_selected). q, k: (B, H, L, D)."""
    k_smooth = k - k.mean(dim=-2, keepdim=True)  # "smooth-k": remove the mean key
    score = _mean_pool(q, blkq) @ _mean_pool(k_smooth, blkk).transpose(-1, -2)  # (B, H, Mq, Nk)
    n_blocks = score.shape[-1]
    chosen = max(1, min(n_blocks, int(topk * n_blocks)))
    return score.topk(chosen, dim=-1, sorted=False).indices


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor,
                           blkq: int = BLKQ, blkk: int = BLKK) -> torch.Tensor:
    """Softmax attention of each query block over its chosen key blocks only; (B, H, L, D) in q's dtype.

    Scores and sums in fp32 (or q's dtype if wider); probabilities rounded to v's dtype before the
    product with v, as the kernel does.
    """
    B, H, L, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    m_blocks, n_blocks, chosen = math.ceil(L / blkq), math.ceil(L / blkk), blocks.shape[-1]
    qb = F.pad(q, (0, 0, 0, m_blocks * blkq - L)).view(B, H, m_blocks, blkq, D)
    kb = F.pad(k, (0, 0, 0, n_blocks * blkk - L)).view(B, H, n_blocks, blkk, D)
    vb = F.pad(v, (0, 0, 0, n_blocks * blkk - L)).view(B, H, n_blocks, blkk, D)
    b_idx = torch.arange(B, device=q.device)[:, None, None, None]
    h_idx = torch.arange(H, device=q.device)[None, :, None, None]
    key_pos = torch.arange(blkk, device=q.device)
    step = max(1, _CHUNK_ELEMENTS // (B * H * blkq * chosen * blkk))
    out = []
    for m0 in range(0, m_blocks, step):
        idx = blocks[:, :, m0:m0 + step]  # (B, H, c, chosen)
        c = idx.shape[2]
        keys = kb[b_idx, h_idx, idx].reshape(B, H, c, chosen * blkk, D)
        values = vb[b_idx, h_idx, idx].reshape(B, H, c, chosen * blkk, D)
        valid = ((idx * blkk)[..., None] + key_pos < L).reshape(B, H, c, 1, chosen * blkk)
        scores = (qb[:, :, m0:m0 + c].to(acc) @ keys.to(acc).transpose(-1, -2)) * D**-0.5  # (B,H,c,blkq,keys)
        scores = scores.masked_fill(~valid, float("-inf"))
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        o = (p.to(v.dtype).to(acc) @ values.to(acc)) / p.sum(dim=-1, keepdim=True)
        out.append(o.to(q.dtype))
    return torch.cat(out, dim=2).reshape(B, H, m_blocks * blkq, D)[:, :, :L]


def linear_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SLA's linear attention with softmax feature maps; (B, H, L, D), in q's dtype throughout."""
    fq, fk = torch.softmax(q, dim=-1), torch.softmax(k, dim=-1)
    kv = fk.transpose(-1, -2) @ v  # (B, H, D, D)
    k_sum = fk.sum(dim=-2, keepdim=True)  # (B, H, 1, D)
    return (fq @ kv) / (1e-5 + (fq * k_sum).sum(dim=-1, keepdim=True))


def _run_kernel(kernel: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return kernel(q, k, v)


@functools.cache
def _kernel_caller():
    """_run_kernel, outside compiled graphs (turbowan.wan.compiled). Made on first use, not at import:
    torch.compiler.disable imports dynamo (a second), which only expert jobs need."""
    return torch.compiler.disable(_run_kernel)


class SparseLinearAttention(torch.nn.Module):
    """SLA: takes and returns (B, L, H, D), like turbodiffusion.SLA.SparseLinearAttention.

    `kernel`: None computes the formula in plain torch; otherwise a turbodiffusion SLA / SageSLA
    module, which runs instead when the inputs are on a GPU and there are enough key blocks for
    it to choose at least one (else it would return NaN). It shares this module's proj_l, so the
    checkpoint's weights load into `proj_l` either way.
    """

    def __init__(self, head_dim: int, topk: float, blkq: int = BLKQ, blkk: int = BLKK,
                 compute_dtype: torch.dtype = torch.bfloat16, kernel: torch.nn.Module | None = None):
        super().__init__()
        self.topk, self.blkq, self.blkk, self.compute_dtype = topk, blkq, blkk, compute_dtype
        self.proj_l = torch.nn.Linear(head_dim, head_dim, dtype=torch.float32)
        self._kernel = [kernel] if kernel is not None else []  # a list: not a registered submodule
        if kernel is not None:
            kernel.proj_l = self.proj_l
            self._call_kernel = _kernel_caller()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._kernel and q.is_cuda and int(self.topk * math.ceil(q.shape[1] / self.blkk)) >= 1:
            return self._call_kernel(self._kernel[0], q, k, v)
        dtype = q.dtype
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        blocks = sla_block_map(q, k, self.topk, self.blkq, self.blkk)  # chosen on the inputs' dtype
        q, k, v = (t.to(self.compute_dtype) for t in (q, k, v))
        o_s = block_sparse_attention(q, k, v, blocks, self.blkq, self.blkk)
        o_l = linear_branch(q, k, v)
        o_l = F.linear(o_l, self.proj_l.weight.to(self.compute_dtype), self.proj_l.bias.to(self.compute_dtype))
        return (o_s + o_l).to(dtype).transpose(1, 2)

    def extra_repr(self) -> str:
        kernel = type(self._kernel[0]).__name__ + " on GPU" if self._kernel else "plain torch"
        return f"topk={self.topk}, blocks={self.blkq}x{self.blkk}, {kernel}"


# --------------------------------------------------------------------------- inside diffusers' network


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on interleaved pairs (x0, x1) of the head dim, as diffusers' Wan processor applies it."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out.type_as(x)


def pieces(length: int, count: int) -> list[slice]:
    """`count` consecutive pieces of range(length), as tensor.chunk cuts them."""
    step = -(-length // count)
    return [slice(start, min(length, start + step)) for start in range(0, length, step)]


# SLA runs over this many groups of heads, one after another: heads are independent, and the
# kernel's working copies (q, k, v transposed, feature maps, both branches' outputs: about 7 GB at
# 720p in one call) then exist for a quarter of the heads at a time.
SLA_HEAD_GROUPS = 4


class SLAAttnProcessor:
    """diffusers' Wan self-attention with `attn.sla` as its core (q/k norms and RoPE unchanged),
    SLA over SLA_HEAD_GROUPS groups of heads."""

    def __init__(self, head_groups: int = SLA_HEAD_GROUPS):
        self.head_groups = head_groups

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SLA replaces self-attention only (no encoder states, no mask)")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # (B, L, H, D)
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)
        out = sla_by_heads(attn.sla, query, key, value, self.head_groups).flatten(2, 3)  # (B, L, H*D)
        return attn.to_out[1](attn.to_out[0](out))


def sla_by_heads(sla: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """SLA over `groups` groups of heads, one at a time; (B, L, H, D) in and out, in q's dtype."""
    out = torch.empty_like(q)
    for h in pieces(q.shape[2], groups):
        out[:, :, h] = sla(q[:, :, h], k[:, :, h], v[:, :, h])
    return out


def _turbodiffusion_sla():
    try:
        from turbodiffusion import SLA
    except Exception as err:  # ImportError, or Triton missing
        log.debug("turbodiffusion.SLA not importable: %s", err)
        return None
    return SLA


def _sagesla_available() -> bool:
    sla = _turbodiffusion_sla()
    return sla is not None and bool(getattr(sla.core, "SAGESLA_ENABLED", False))


def resolve_attention(
    mode: str, has_sla: bool, device: torch.device, path: str, kernels: bool = True
) -> tuple[str, str]:
    """(mode, implementation) for a checkpoint: auto -> sla when it has SLA weights, else sdpa.

    kernels=False keeps to plain torch even where turbodiffusion's kernels could run."""
    if mode not in ATTENTION_MODES:
        raise AttentionConfigError(f"attention: {mode!r} is not one of {', '.join(ATTENTION_MODES)}")
    if mode == "auto":
        mode = "sla" if has_sla else "sdpa"
    if mode in ("sla", "sagesla") and not has_sla:
        raise AttentionConfigError(
            f"{path}: attention {mode!r} needs an SLA checkpoint (blocks.N.self_attn.attn_op.local_attn.proj_l "
            "weights); this file has none: use attention: sdpa (or auto)"
        )
    if mode == "sagesla":
        if device.type != "cuda" or not kernels or not _sagesla_available():
            raise AttentionConfigError(
                "attention: sagesla needs a CUDA GPU with the turbodiffusion package and SpargeAttn "
                "(spas_sage_attn, not on PyPI) installed; use sla instead"
            )
        return mode, "turbodiffusion SageSLA"
    if mode == "sla":
        kernel = kernels and device.type == "cuda" and _turbodiffusion_sla() is not None
        return mode, "turbodiffusion SLA (Triton)" if kernel else "plain torch SLA"
    return mode, "SDPA"


def install_attention(model: torch.nn.Module, mode: str, implementation: str, topk: float) -> None:
    """Give every block's self-attention an (empty, meta) SLA module and the SLA processor.

    Done before the weights are assigned, so the checkpoint's proj_l tensors load into
    `blocks.N.attn1.sla.proj_l`. Nothing to do for sdpa.
    """
    if mode == "sdpa":
        return
    head_dim = model.config.attention_head_dim
    if implementation.startswith("turbodiffusion"):
        _kernel_caller()  # (its first call imports dynamo: here, not inside the meta-device context below)
    for block in model.blocks:
        with torch.device("meta"):
            kernel = None
            if implementation.startswith("turbodiffusion SageSLA"):
                kernel = _turbodiffusion_sla().SageSparseLinearAttention(head_dim=head_dim, topk=topk)
            elif implementation.startswith("turbodiffusion"):
                kernel = _turbodiffusion_sla().SparseLinearAttention(head_dim=head_dim, topk=topk, BLKQ=BLKQ, BLKK=BLKK)
            core = SparseLinearAttention(head_dim, topk, kernel=kernel)
        parent, _, name = SLA_MODULE.rpartition(".")
        setattr(getattr(block, parent), name, core)
        block.attn1.set_processor(SLAAttnProcessor())
