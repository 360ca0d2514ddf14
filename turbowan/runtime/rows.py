"""One row of a model stage, in whatever process holds the models (a worker, or the job itself)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable

from ..progress import host_rss_gb
from .faults import inject, kill_job

log = logging.getLogger("turbowan.job")

# Packages that diffusers and transformers import whenever they are installed, and that no stage
# uses: peft (LoRA adapters) and, through transformers' generation and image utilities,
# scikit-learn, torchvision and timm. Hiding them takes about a second off each model library's
# import where they are installed (BENCHMARKS.md).
UNUSED_PACKAGES = ("peft", "sklearn", "torchvision", "timm")


def hide_unused_packages() -> list[str]:
    """Mark UNUSED_PACKAGES as not importable in this process, the way Python itself does (None in
    sys.modules): `import` of one raises ImportError and importlib.util.find_spec, which diffusers'
    and transformers' availability checks use, says it is not there. One already imported is left.
    Returns the names hidden."""
    hidden = [name for name in UNUSED_PACKAGES if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    return hidden


def run_model_stage(stage: str, key: str, args: dict[str, Any], faults: str, ctx,
                    on_kill: Callable[[], None] = kill_job) -> None:
    """Run `stage` for one row with the context `ctx` (a worker's, kept for its next job, or a fresh
    one); log its time and memory peaks. Raises what the stage raises."""
    import torch

    from ..stages import model_stage

    function = model_stage(stage)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    inject(stage, key, faults, on_kill, ctx.cancel.is_set)
    function(**args, ctx=ctx)
    gpu = ""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # allocated: what the tensors needed; reserved: what PyTorch's cache held. GB = 10^9 bytes.
        gpu = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB "
               f"(reserved {torch.cuda.max_memory_reserved() / 1e9:.2f} GB)")
    now, peak = host_rss_gb()
    log.info("%s done in %.1f s; host RSS %.2f GB (process peak %.2f GB)%s", stage, time.perf_counter() - started,
             now, peak, gpu)
