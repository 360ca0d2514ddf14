"""Read a safetensors file with plain reads, one tensor at a time.

safetensors' own reader memory-maps the file: every page a job touches stays mapped, so loading a
28.6 GB expert leaves 28.6 GB in the job's resident memory until the file is closed. Reading each
tensor with pread into a fresh buffer keeps only the tensor in flight in host memory; once it is
on the GPU its buffer is freed.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CHUNK = 256 * 1024**2  # one read call stays well below Linux's 2 GiB per-call limit


class SafetensorsFormatError(ValueError):
    pass


class SafetensorsFile:
    """`get_tensor(name)` -> a CPU tensor of its own (not a view of a memory map)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            header_len = struct.unpack("<Q", os.pread(self.fd, 8, 0))[0]
            if header_len > size - 8:
                raise SafetensorsFormatError(f"{self.path}: header length {header_len} exceeds the file")
            header = json.loads(os.pread(self.fd, header_len, 8))
            header.pop("__metadata__", None)
            self.entries = header
            self.base = 8 + header_len
            end = max((e["data_offsets"][1] for e in header.values()), default=0)
            if self.base + end > size:
                raise SafetensorsFormatError(f"{self.path}: ends at {size} bytes, its header needs {self.base + end}")
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (struct.error, ValueError, KeyError, TypeError) as err:
            os.close(self.fd)
            if isinstance(err, SafetensorsFormatError):
                raise
            raise SafetensorsFormatError(f"{self.path}: not a safetensors file ({err})") from err

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        data = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(data.numpy())
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:done + CHUNK]], self.base + start + done)
            if got <= 0:
                raise SafetensorsFormatError(f"{self.path}: ended while reading {name!r}")
            done += got
        return data.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
