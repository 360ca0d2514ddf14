"""Timed phases in a job's log, so a slow stage shows where its seconds went, and model loads that
say what they load, how big it is and how fast it came (a 28 GB expert can take minutes)."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("turbowan.progress")


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Log how long the block took (GPU work included: CUDA is synchronised at the end)."""
    import torch

    started = time.perf_counter()
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    log.info("%s: %.2f s", name, time.perf_counter() - started)


def _size_bytes(path: str | Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return os.path.getsize(path) if path.exists() else 0  # a missing file: the loader says so


def announce_load(logger: logging.Logger, what: str, path: str | Path, device: object) -> float:
    """Log 'loading <what> <path> (<size> GB) onto <device>'; returns the start time for `took`."""
    logger.info("loading %s %s (%.2f GB) onto %s", what, path, _size_bytes(path) / 1e9, device)
    return time.perf_counter()


def took(path: str | Path, started: float) -> str:
    """'<s> s (<GB/s>); host RSS <GB> (peak <GB>)': the time since `started`, the file's size over
    it, and the process's host memory (a load should leave none of the file behind)."""
    seconds = time.perf_counter() - started
    rate = _size_bytes(path) / 1e9 / seconds if seconds > 0 else float("inf")
    now, peak = host_rss_gb()
    return f"{seconds:.1f} s ({rate:.2f} GB/s); host RSS {now:.2f} GB (peak {peak:.2f} GB)"


def host_rss_gb() -> tuple[float, float]:
    """This process's resident host memory now and at its peak, in GB (VmRSS, VmHWM; ru_maxrss
    would include a parent's peak from before exec). Where /proc is missing: 0 now, and the peak
    from ru_maxrss."""
    values = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    values[line[:5]] = int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    if "VmHWM" not in values:
        import resource

        values["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return values.get("VmRSS", 0.0), values["VmHWM"]
