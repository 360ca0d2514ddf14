"""Compiled expert blocks: torch.compile over the 40 transformer blocks of an expert.

A good part of an eager forward goes to small elementwise passes: float32 layer norms and their
modulation, the q/k RMS norms, RoPE, gates and residuals, each one a full read and write of a
75,600 x 5,120 activation at 720p. Inductor fuses them. Compiling each block on its own ("regional
compilation") compiles the block's code once and reuses it for all 40 blocks, so a job pays one
compile of one block, not of the whole network. Inductor's on-disk cache makes every later job's
compile shorter than the first's. What it saves on a GPU: BENCHMARKS.md ("Reference
measurements", and the eager/compiled probe).

SLA's Triton kernel and turbodiffusion's int8 GEMM stay outside the compiled graphs
(`torch.compiler.disable` at their calls): the graphs stop and resume around them.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "true", "false")


def compile_wanted(setting: bool | str, device: torch.device) -> bool:
    """config `compile`: true, false, or auto (on a CUDA GPU)."""
    setting = str(setting).lower()
    if setting not in COMPILE_MODES:
        raise ValueError(f"compile: {setting!r} is not one of {', '.join(COMPILE_MODES)}")
    if setting == "auto":
        return device.type == "cuda"
    return setting == "true"


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> None:
    """Compile each transformer block in place (done lazily, at the first forward).

    A compile that fails (no C compiler, an unsupported op) falls back to running that block
    eagerly, with a warning in the job's log, rather than failing the row.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    # one entry per video size a job meets (rows of a group may differ); beyond it, eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    for block in model.blocks:  # (diffusers' blocks, or turbowan.wan.slicing's SlicedBlock around them)
        block.compile(backend=backend, dynamic=False)
    log.info("expert blocks compiled with torch.compile (%s; the first step pays the compile)", backend)
