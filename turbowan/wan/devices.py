"""Device and dtype names from the config."""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> the job's GPU when there is one (CUDA_VISIBLE_DEVICES picks it), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"config asks for device {name!r}, but this job sees no CUDA GPU")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def release(device: torch.device) -> None:
    """Give cached GPU memory back after a model is dropped."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
