"""Expert blocks that work in slices: the same output with a fraction of the working memory.

At 720p a block's activations are 75,600 tokens x 5,120 channels (0.72 GiB in bf16, twice that
in the float32 the norms and residuals use), and its feed-forward is 13,824 wide. Eager and
unsliced, an expert job holds several of these at once on top of its weights: too much beside an
int8 expert (13.6 GiB) on a 24 GB card (measured peaks: BENCHMARKS.md). Nearly all of a block
works token by token (norms, modulation, projections, RoPE, cross-attention queries, the
feed-forward, residuals); only self-attention mixes tokens, and SLA works head by head. So
`SlicedBlock` runs the token-wise parts over slices of the sequence and SLA over groups of heads,
keeping whole only q, k, v and the attention output.
"""

from __future__ import annotations

import torch

from .attention import SLA_HEAD_GROUPS, SLAAttnProcessor, apply_rotary, pieces, sla_by_heads

# Cards with less memory than this (24 GB consumer cards) get their experts' activations sliced.
SMALL_CARD_BYTES = 40 * 1024**3


def activation_slices_for(setting: int | str, device: torch.device) -> int:
    """'auto': 8 slices on a card under 40 GB (with int8 experts a 720p job then fits 24 GB), else 1."""
    if setting != "auto":
        return max(1, int(setting))
    if device.type != "cuda":
        return 1
    return 8 if torch.cuda.get_device_properties(device).total_memory < SMALL_CARD_BYTES else 1


class ChunkedFeedForward(torch.nn.Module):
    """A block's feed-forward over `chunks` slices of the sequence (for experts without SLA, whose
    blocks stay diffusers' own)."""

    def __init__(self, ffn: torch.nn.Module, chunks: int):
        super().__init__()
        self.ffn, self.chunks = ffn, chunks

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        parts = hidden_states.chunk(self.chunks, dim=1)
        return torch.cat([self.ffn(part) for part in parts], dim=1)


class SlicedBlock(torch.nn.Module):
    """diffusers' WanTransformerBlock (Wan2.2 A14B: one modulation per video, SLA self-attention)
    computed in slices; its forward follows the block's own, step by step."""

    def __init__(self, block: torch.nn.Module, slices: int):
        super().__init__()
        self.block, self.slices = block, slices

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        block, attn = self.block, self.block.attn1
        if temb.ndim != 3:
            raise ValueError("activation slices support one modulation per video (Wan2.2 A14B), not per token")
        shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
        batch, length, _ = hidden_states.shape
        token_slices = pieces(length, self.slices)

        # 1. Self-attention: q, k, v a slice of tokens at a time (norm, projection, RoPE), SLA a
        # group of heads at a time.
        q, k, v = (hidden_states.new_empty(batch, length, attn.heads, attn.inner_dim // attn.heads) for _ in range(3))
        for s in token_slices:
            x = (block.norm1(hidden_states[:, s].float()) * (1 + scale) + shift).type_as(hidden_states)
            q_s = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))  # [B, l, H, 128]
            k_s = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                cos, sin = (r[:, s] for r in rotary_emb)  # [1, l, 1, 128]
                q_s, k_s = apply_rotary(q_s, cos, sin), apply_rotary(k_s, cos, sin)
            q[:, s], k[:, s] = q_s, k_s
            v[:, s] = attn.to_v(x).unflatten(2, (attn.heads, -1))
        attended = sla_by_heads(attn.sla, q, k, v, max(self.slices, SLA_HEAD_GROUPS))  # [B, L, H, 128]
        del q, k, v
        attended = attended.flatten(2, 3)  # [B, L, H*128]

        # 2. Then every token on its own: the gated residual, cross-attention, the feed-forward.
        out = torch.empty_like(hidden_states)
        for s in token_slices:
            x = attn.to_out[1](attn.to_out[0](attended[:, s]))
            x = (hidden_states[:, s].float() + x * gate).type_as(hidden_states)
            x = x + block.attn2(block.norm2(x.float()).type_as(x), encoder_hidden_states, None, None)
            n = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
            out[:, s] = (x.float() + block.ffn(n).float() * c_gate).type_as(x)
        return out


def slice_activations(model: torch.nn.Module, slices: int) -> None:
    """Run each block in `slices` slices: SLA experts' blocks as SlicedBlock, others' feed-forward
    as ChunkedFeedForward. Call after the weights are in (the wrappers rename the keys)."""
    if slices <= 1:
        return
    for i, block in enumerate(model.blocks):
        if isinstance(block.attn1.processor, SLAAttnProcessor):
            model.blocks[i] = SlicedBlock(block, slices)
        else:
            block.ffn = ChunkedFeedForward(block.ffn, slices)
