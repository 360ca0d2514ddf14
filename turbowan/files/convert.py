"""prepare_models: turn a `.pth` checkpoint into the safetensors file the pipeline loads.

A `.pth` is a pickle: it is opened only with `torch.load(weights_only=True, mmap=True)`, and only
once, here, in a CPU job. The output keeps the file's own layout (official key names, dtypes:
bf16 weights, int8 `int8_weight` + float32 `scale`, SLA `proj_l`), minus the `net.` /
`_checkpoint_wrapped_module.` wrappers, so the loaders read it like any official-layout
safetensors file and every expert job streams tensors straight from it to the GPU.

Memory: `torch.load(mmap=True)` maps the file and reads nothing up front; the writer below emits
the safetensors header, then each tensor's bytes in turn. So the job holds no anonymous copy of
the checkpoint: its peak is one tensor's copy at most (a non-contiguous tensor; 141 MB for the
largest A14B weight, 13824 x 5120 bf16). The pages of the mapped source count towards the reported
RSS as they are read, but they are clean page cache that the kernel drops under pressure, not a
second copy. Checked by tests/test_convert.py: converting a 200 MB expert grows the job's anonymous
memory by well under 1 MB (copying each tensor first would add the full 200 MB).

Why not safetensors' save_file: since 0.8 it copies nothing either (given the memory-mapped tensors
of a 1.16 GB .pth it wrote the file with 0.2 MB of anonymous memory, like this writer), but it lays
the file out differently: tensors ordered by dtype alignment, then name, where this writer orders
them by name alone, so a converted checkpoint would no longer be byte-identical to the ones
converted before. It also refuses non-contiguous tensors, which would then be copied all at once
up front rather than one at a time here.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable

import torch

from .artifacts import META_KEY, atomic_path, fingerprint, package_versions
from .formats import (
    CheckpointError, TensorInfo, check_role, clean_dit_key, container_of, dtype_name, inspect_model, load_pth,
    read_index,
)

log = logging.getLogger(__name__)

_DTYPE_NAMES = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
    torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]] | dict, path: str | Path,
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor (header first, then each tensor's bytes), atomically.

    Tensors in name order, the header padded with spaces to 8 bytes; never more than one tensor's
    bytes held at a time (a copy only of a non-contiguous tensor).
    """
    items = sorted(tensors.items() if isinstance(tensors, dict) else tensors, key=lambda kv: kv[0])
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in items:
        if tensor.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format allows trailing spaces; keeps data 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, tensor in items:
            flat = tensor.detach().contiguous().reshape(-1)  # a copy only when the source is strided
            if flat.numel():
                f.write(memoryview(flat.view(torch.uint8).numpy()))
            del flat


def prepare_model(source: str, out: str, role: str) -> None:
    """Convert the `.pth` named for `role` (high, low, vae, text_encoder) into safetensors at `out`.

    Checks the file first (CheckpointError naming it when it is not what the role needs), so a
    wrong file stops here, in a CPU job, before any GPU job loads it.
    """
    started = time.perf_counter()
    source_path = Path(source)
    if container_of(source_path) != "pth":
        raise CheckpointError(f"{source}: already a safetensors file; it needs no conversion")
    tensors = load_pth(source_path)  # memory-mapped: nothing read yet
    index = {k: TensorInfo(dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
    info = check_role(inspect_model(source_path, index, "pth"), role)
    log.info("%s: %s, %d tensors", source, info.describe(), len(tensors))
    rename = clean_dit_key if info.kind == "dit" else (lambda k: k)
    record = {
        "stage": "prepare_models",
        "params": {"role": role, "layout": info.layout},
        "inputs": {"source": fingerprint(source_path)},
        "versions": package_versions(),
    }
    write_safetensors(((rename(k), v) for k, v in tensors.items()), out,
                      metadata={META_KEY: json.dumps(record, sort_keys=True)})
    del tensors
    _, written = read_index(out)
    expected = {rename(k): v for k, v in index.items()}
    if written != expected:
        raise CheckpointError(f"{out}: the written file does not match {source} (disk full?)")
    log.info("wrote %s (%d tensors) in %.1f s", out, len(written), time.perf_counter() - started)

