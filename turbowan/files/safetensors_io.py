"""Stream a safetensors file to a CUDA device through reused pinned buffers (`SafetensorsFile.to_device`).

Everything else reads safetensors with safetensors itself (>= 0.8): on the CPU with
`safe_open(..., backend="pread")`, which reads each tensor with pread(2) into memory of its own and
leaves nothing of the file mapped (the default "mmap" backend keeps every page a job touched in its
RSS until the file is closed: 28.6 GB for an A14B expert). This module stays for the GPU path only,
until a GPU benchmark measures it against the library (safe_open(..., device="cuda", backend=
"pread")): reader threads pread runs of the file, many tensors a read, into a few reused pinned
buffers while the GPU copies the previous ones, so host memory stays at those buffers (1 GB)
however large the file.
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

from .formats import SAFETENSORS_DTYPES

DTYPES = {code: getattr(torch, name) for code, name in SAFETENSORS_DTYPES.items()}
CHUNK = 256 * 1024**2  # one read call stays well below Linux's 2 GiB per-call limit
# Staging for to_device: 4 pinned buffers of 256 MB (an A14B expert's largest tensor, an FFN
# weight, is 141 MB in bf16; umT5's 2.1 GB embedding goes through on its own).
SLAB_BYTES = 256 * 1024**2
SLABS = 4


class SafetensorsFormatError(ValueError):
    pass


def release_pinned_cache() -> None:
    """Give freed pinned host memory back to the system. PyTorch's pinned-memory allocator keeps
    what it freed for reuse, so without this the slabs of a load (1 GB) would stay in the job's
    RSS until it ends. (torch.accelerator.empty_host_cache in newer torch, torch._C._host_emptyCache
    in 2.11 and before; a no-op in a torch with neither.)"""
    empty_host_cache = (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
                        or getattr(torch._C, "_host_emptyCache", None))
    if empty_host_cache is not None:
        empty_host_cache()


class SafetensorsFile:
    """A safetensors file opened for `to_device` (and `get_tensor`, a CPU tensor of its own, for what
    a CUDA load needs besides the stream: a tensor larger than a slab, an fp8 scale)."""

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
        return self._typed(self._read_range(start, end, torch.empty(end - start, dtype=torch.uint8)), entry)

    def to_device(
        self, names: list[str], device: torch.device, slab_bytes: int = SLAB_BYTES, slabs: int = SLABS
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor on `device`) for each of `names`, in the file's order.

        Neighbouring tensors travel together: reader threads pread runs of the file, up to a slab
        long, into a few reused pinned buffers ("slabs"); each slab goes to the GPU in one
        asynchronous copy, into a staging buffer there, and each tensor is then copied out of that
        into memory of its own. (Read and copied one by one, the 1,095 tensors of an expert each
        waited for a reader and for a copy, and while the job imported diffusers each wait cost up
        to a GIL switch interval.) A slab is reused once its copy has completed. Host memory stays
        at the slabs (1 GB) however large the file; a tensor larger than a slab goes on its own.
        """
        cuda = device.type == "cuda"
        try:
            yield from self._to_device(names, device, slab_bytes, slabs)
        finally:
            if cuda:
                release_pinned_cache()

    def _to_device(self, names: list[str], device: torch.device, slab_bytes: int, slabs: int):
        cuda = device.type == "cuda"
        free = [torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(slabs)]
        staging = torch.empty(slab_bytes, dtype=torch.uint8, device=device) if cuda else None
        copying: deque = deque()  # (event, slab) of copies in flight
        reads: deque = deque()  # (run, slab or None, future) in file order
        pending = iter(self._runs(names, slab_bytes))

        def take_slab() -> torch.Tensor:
            if not free:  # every slab holds data or a copy in flight: wait for the oldest copy
                event, slab = copying.popleft()
                event.synchronize()
                free.append(slab)
            return free.pop()

        with ThreadPoolExecutor(max_workers=max(1, slabs - 1), thread_name_prefix="read") as pool:
            def submit_next() -> None:
                run = next(pending, None)
                if run is None:
                    return
                start, end, _ = run
                if end - start > slab_bytes:  # one tensor, larger than a slab
                    reads.append((run, None, None))
                    return
                slab = take_slab()
                reads.append((run, slab, pool.submit(self._read_range, start, end, slab)))

            for _ in range(slabs - 1):
                submit_next()
            while reads:
                (start, _, run_names), slab, future = reads.popleft()
                if slab is None:
                    tensors = [(run_names[0], self.get_tensor(run_names[0]).to(device))]
                else:
                    block = future.result()
                    if cuda:  # one copy to the GPU; the slab is free again once it has completed
                        block = staging[: len(block)].copy_(block, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record()
                        copying.append((event, slab))
                    tensors = ((name, self._cut(block, name, start)) for name in run_names)
                for name, tensor in tensors:
                    yield name, tensor
                if slab is not None and not cuda:
                    free.append(slab)
                submit_next()
        if cuda:
            torch.cuda.current_stream().synchronize()

    def _runs(self, names: list[str], limit: int) -> list[tuple[int, int, list[str]]]:
        """(start, end, names) of the runs of the file to read: the wanted tensors in file order, as
        many neighbours together as fit in `limit` bytes (what lies between them is read too)."""
        runs: list[tuple[int, int, list[str]]] = []
        for name in sorted(set(names), key=lambda n: self.entries[n]["data_offsets"]):
            start, end = self.entries[name]["data_offsets"]
            if runs and end - runs[-1][0] <= limit and runs[-1][1] - runs[-1][0] <= limit:
                runs[-1] = (runs[-1][0], end, runs[-1][2] + [name])
            else:
                runs.append((start, end, [name]))
        return runs

    def _read_range(self, start: int, end: int, buffer: torch.Tensor) -> torch.Tensor:
        """Bytes [start, end) of the data area into the front of a uint8 CPU `buffer`."""
        data = buffer[: end - start]
        view = memoryview(data.numpy())
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:done + CHUNK]], self.base + start + done)
            if got <= 0:
                raise SafetensorsFormatError(f"{self.path}: ended at byte {self.base + start + done} of a read")
            done += got
        return data

    def _cut(self, block: torch.Tensor, name: str, block_start: int) -> torch.Tensor:
        """Tensor `name`, copied out of `block` (uint8 bytes from `block_start` on) into its own memory."""
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        return self._typed(block[start - block_start: end - block_start].clone(), entry)  # (fresh, aligned)

    @staticmethod
    def _typed(data: torch.Tensor, entry: dict) -> torch.Tensor:
        """A tensor's uint8 bytes as its dtype and shape (a view)."""
        return data.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
