"""Read a safetensors file with plain reads, one tensor at a time.

safetensors' own reader memory-maps the file: every page a job touches stays mapped, so loading a
28.6 GB expert leaves 28.6 GB in the job's resident memory until the file is closed. Reading each
tensor with pread keeps only the tensors in flight in host memory. To a GPU they go through a few
reused pinned buffers, read ahead by threads while the GPU copies (`SafetensorsFile.to_device`).
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CHUNK = 256 * 1024**2  # one read call stays well below Linux's 2 GiB per-call limit
# Staging for to_device: 4 pinned buffers of 256 MB (an A14B expert's largest tensor, an FFN
# weight, is 141 MB in bf16; umT5's 2.1 GB embedding goes through on its own).
SLAB_BYTES = 256 * 1024**2
SLABS = 4


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

    def nbytes(self, name: str) -> int:
        start, end = self.entries[name]["data_offsets"]
        return end - start

    def read_into(self, name: str, buffer: torch.Tensor) -> torch.Tensor:
        """Read a tensor's bytes into the front of a uint8 CPU `buffer`; returns it typed and shaped."""
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        data = buffer[: end - start]
        view = memoryview(data.numpy())
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:done + CHUNK]], self.base + start + done)
            if got <= 0:
                raise SafetensorsFormatError(f"{self.path}: ended while reading {name!r}")
            done += got
        return data.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.read_into(name, torch.empty(self.nbytes(name), dtype=torch.uint8))

    def to_device(
        self, names: list[str], device: torch.device, slab_bytes: int = SLAB_BYTES, slabs: int = SLABS
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor on `device`) in order, reading ahead while earlier tensors are copied.

        On a GPU, reader threads pread the next tensors into a few reused pinned buffers ("slabs")
        while the GPU copies earlier ones out of theirs (asynchronous copies from pinned memory); a
        slab is reused only after its copy's event has completed. Host memory stays at the slabs
        (1 GB), however large the file. A tensor larger than a slab is read and copied on its own.
        """
        cuda = device.type == "cuda"
        free = [torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(slabs)]
        copying: deque = deque()  # (event, slab) of copies in flight
        reads: deque = deque()  # (name, slab or None, future) in file order
        pending = iter(names)

        def take_slab() -> torch.Tensor:
            if not free:  # every slab holds data or a copy in flight: wait for the oldest copy
                event, slab = copying.popleft()
                event.synchronize()
                free.append(slab)
            return free.pop()

        with ThreadPoolExecutor(max_workers=max(1, slabs - 1), thread_name_prefix="read") as pool:
            def submit_next() -> None:
                name = next(pending, None)
                if name is None:
                    return
                if self.nbytes(name) > slab_bytes:
                    reads.append((name, None, None))
                    return
                slab = take_slab()
                reads.append((name, slab, pool.submit(self.read_into, name, slab)))

            for _ in range(slabs - 1):
                submit_next()
            while reads:
                name, slab, future = reads.popleft()
                if slab is None:
                    tensor = self.get_tensor(name).to(device)
                else:
                    staged = future.result()
                    tensor = torch.empty_like(staged, device=device)
                    tensor.copy_(staged, non_blocking=cuda)
                    if cuda:
                        event = torch.cuda.Event()
                        event.record()
                        copying.append((event, slab))
                    else:
                        free.append(slab)
                submit_next()
                yield name, tensor
        if cuda:
            torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
