"""What every stage job does around its work: take its GPU, log to its log file, time it, report
peak memory."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, NoReturn

from .runtime.gpus import assign_gpu
from .progress import host_rss_gb

log = logging.getLogger("turbowan.job")


def _setup_logging(log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    logging.basicConfig(
        level=logging.INFO, handlers=handlers, force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _gpu_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return "device: cpu"
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    uuid = getattr(props, "uuid", "")
    return (f"device: cuda:{torch.cuda.current_device()} {props.name} uuid={uuid} "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}")


FAULT_ENV = "TURBOWAN_INJECT_FAULT"


def injected_fault(name: str, key: str) -> None:
    """Fail on purpose where TURBOWAN_INJECT_FAULT says so, for fault-injection tests and drills.

    TURBOWAN_INJECT_FAULT="sample_low:row7,decode:row9" makes those stages of those rows raise (a
    row's key is its id, or the prompt key for encode_prompt). "sample_low:row7:kill" instead
    SIGKILLs the job's whole process group there, as a dead node or the kernel's OOM killer would.
    """
    for item in os.environ.get(FAULT_ENV, "").split(","):
        stage, _, rest = item.strip().partition(":")
        wanted, _, how = rest.partition(":")
        if (stage, wanted) != (name, key):
            continue
        if how == "kill":
            logging.shutdown()
            os.killpg(os.getpgid(0), signal.SIGKILL)
        raise RuntimeError(f"fault injected by {FAULT_ENV} for {name}:{key}")


def run_stage(
    name: str, log_file: str | None, stage: Callable[..., Any], *, gpus: int = 0, process_note: str = "",
    **kwargs: Any
) -> None:
    """Run one stage function with logging; a failure is logged with its traceback and re-raised.

    `gpus` is the rule's `resources.gpu`: a GPU job first takes a card of its own (turbowan.runtime.gpus),
    before anything initialises CUDA. `process_note` says what the process is (a fork server's
    worker, or why not). `kwargs` go to the stage.
    """
    _setup_logging(log_file)
    if gpus not in (0, 1):
        raise ValueError(f"{name}: resources gpu={gpus}; a stage uses at most one GPU")
    started = time.perf_counter()
    try:
        card = assign_gpu(name, str(kwargs.get("device", "auto"))) if gpus else None
    except Exception:
        log.exception("%s could not get a GPU after %.1f s", name, time.perf_counter() - started)
        raise
    log.info("%s on %s (pid %d%s); %s", name, socket.gethostname(), os.getpid(),
             f", {process_note}" if process_note else "", card.describe() if card else "gpu: not requested")
    # (a CPU stage's job, an mp4's, need not import torch: a second and a half of its start)
    log.info("%s", _gpu_line() if gpus or "torch" in sys.modules else "device: cpu")
    started = time.perf_counter()
    try:
        try:
            injected_fault(name, os.path.basename(log_file or "").removesuffix(".log"))
            stage(**kwargs)
        except Exception:
            log.exception("%s failed after %.1f s", name, time.perf_counter() - started)
            raise
        rss_gb = host_rss_gb()[1]
        gpu = ""
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            # allocated: what the tensors needed; reserved: what PyTorch's cache held. GB = 10^9 bytes.
            gpu = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB "
                   f"(reserved {torch.cuda.max_memory_reserved() / 1e9:.2f} GB)")
        log.info("%s done in %.1f s; peak host RSS %.2f GB%s", name, time.perf_counter() - started, rss_gb, gpu)
    finally:
        if card:
            card.release()  # (a killed job releases it too: the kernel drops the flock)


# Packages that diffusers and transformers import whenever they are installed, and that no stage
# uses: peft (LoRA adapters) and, through transformers' generation and image utilities,
# scikit-learn, torchvision and timm. On the H100 machines, which have all four, hiding them took
# 0.9 to 1.4 s off each model library's import (means of 3; BENCHMARKS.md).
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


def resolve_stage(stage: str) -> Callable[..., Any]:
    """A stage function from its name, "module:function" (e.g. "turbowan.stages:decode_latents")."""
    module, _, function = stage.partition(":")
    return getattr(importlib.import_module(module), function)


def run_job(name: str, log_file: str | None, stage: str | Callable[..., Any], **kwargs: Any) -> NoReturn:
    """A model job: run_stage in a worker of the fork server (turbowan.forkserver), which has
    imported torch and the model libraries already, when there is one and the stage is given by
    name ("module:function"); else in this process, with hide_unused_packages.

    Either way the job ends at once (os._exit) once its log is flushed: Python's orderly exit takes
    2.9 s with a compiled expert on an H100 (0.5 s this way), seconds that the next job waits for.
    The process's outputs are all closed by then, and the kernel frees its memory, GPU memory and
    lock. A failure in this process raises as in run_stage (a normal exit); a worker's failure ends
    the job with the worker's exit code."""
    note = ""
    if isinstance(stage, str):
        from .forkserver import serve_job  # (it imports this module)

        status, why_not = serve_job(name, log_file, stage, kwargs)
        if status is not None:
            os._exit(status)
        note = f"own imports: {why_not}"
    hide_unused_packages()
    if isinstance(stage, str):
        stage = resolve_stage(stage)
    run_stage(name, log_file, stage, process_note=note, **kwargs)
    flush_job_output()
    os._exit(0)


def flush_job_output() -> None:
    """Write out the job's log and streams: what os._exit, which ends a job, would drop."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # (a stream closed or gone)
            pass
