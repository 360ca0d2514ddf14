"""Timed phases in a job's log, so a slow stage shows where its seconds went."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
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
