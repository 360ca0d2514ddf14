"""What a stage gets besides its row: the models already loaded, and a way to learn that its job
was cancelled.

A resident worker (turbowan.runtime.worker) keeps one `StageContext` for its whole life, so the
next row of a stage finds its model loaded. A job that runs in its own process (`worker: false`)
makes a fresh one. Either way a stage's code is the same, which is what keeps their results equal.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)

# A card smaller than this holds one model at a time (a 14B expert is 28.6 GB in bf16, 14.6 GB in
# int8, and its activations need the rest); a bigger card keeps several within MODEL_SHARE of it.
SMALL_CARD_BYTES = 40 * 10**9
MODEL_SHARE = 0.75
HOST_SHARE = 0.5  # on the CPU: of the host's memory


class Cancelled(RuntimeError):
    """The job that asked for this row is gone (Ctrl-C, a kill, scancel): stop at the next step."""


def model_bytes(model: Any) -> int:
    """Bytes of a module's parameters and buffers (0 for things that are not modules: tokenizers)."""
    tensors = [*getattr(model, "parameters", lambda: [])(), *getattr(model, "buffers", lambda: [])()]
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_budget(device) -> tuple[int, int]:
    """(bytes the resident models may take, how many may stay at once; 0 = no count limit)."""
    import torch

    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(total * MODEL_SHARE), (1 if total < SMALL_CARD_BYTES else 0)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages * HOST_SHARE), 0


@dataclass
class ModelCache:
    """Models by key, least recently used first out when a new one would not fit the budget."""

    _models: OrderedDict = field(default_factory=OrderedDict)  # key -> (model, bytes)

    def get(self, key: Hashable, load: Callable[[], Any], device, expected_bytes: int = 0) -> Any:
        """The model under `key`, loaded with `load()` if it is not resident. `expected_bytes` (the
        file's size) lets older models leave before the new one arrives, not after."""
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key][0]
        budget, count = memory_budget(device)
        while self._models and (
            (count and len(self._models) >= count) or self.resident_bytes() + expected_bytes > budget
        ):
            self.evict_oldest(device)
        model = load()
        self._models[key] = (model, model_bytes(model))
        return model

    def resident_bytes(self) -> int:
        return sum(size for _, size in self._models.values())

    def evict_oldest(self, device) -> None:
        key, _ = self._models.popitem(last=False)
        log.info("model %s leaves memory to make room", key[0] if isinstance(key, tuple) else key)
        release(device)

    def evict_where(self, leaves: Callable[[Hashable], bool], device) -> None:
        """Every model whose key `leaves(key)` says leaves (e.g. another LoRA merge of one expert)."""
        gone = [k for k in self._models if leaves(k)]
        for key in gone:
            log.info("model %s leaves memory (another variant of it is wanted)", key[0] if isinstance(key, tuple) else key)
            del self._models[key]
        if gone:
            release(device)

    def evict_all_but(self, keep: Hashable | None, device) -> None:
        """Make room after running out of memory: every model but `keep` leaves."""
        for key in [k for k in self._models if k != keep]:
            del self._models[key]
        release(device)

    def __len__(self) -> int:
        return len(self._models)


def release(device) -> None:
    """Give memory of dropped models and tensors back (the CUDA caching allocator keeps it otherwise)."""
    gc.collect()
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.empty_cache()


@dataclass
class StageContext:
    models: ModelCache = field(default_factory=ModelCache)
    cancel: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise Cancelled if the job asked to stop; stages call it between steps and before writing."""
        if self.cancel.is_set():
            raise Cancelled("the job was cancelled; this row stopped before finishing")


def file_key(path: str) -> tuple:
    """What identifies a model file's contents cheaply: a replaced file gets a new key."""
    stat = os.stat(path)
    return (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
