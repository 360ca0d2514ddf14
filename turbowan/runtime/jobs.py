"""What every job does around its stage: log to its log file, take a card, run the stage (in the
card's resident worker, or here), and end with the stage's status.

A model job (encode_prompt, encode_image, sample_high, sample_low, decode) is a thin client by
default: it imports no torch, takes a card (turbowan.runtime.gpus) and hands its row to that card's
worker (turbowan.runtime.client), which keeps the models loaded between jobs. With `worker: false`
the job runs the stage in its own process instead, loading what it needs: the reference that a
worker's results must equal byte for byte.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Any, Callable

from ..progress import host_rss_gb
from .client import run_in_worker
from .faults import FAULT_ENV, inject
from .gpus import assign_gpu
from .logs import flush_job_output, setup_logging
from ..private import compiler_cache_env
from .rows import hide_unused_packages, run_model_stage

log = logging.getLogger("turbowan.job")


def run_model_job(stage: str, key: str, log_file: str, args: dict[str, Any], *, gpus: int = 1, worker: bool = True,
                  idle_s: float = 300.0) -> None:
    """A model job: take a card, run the row in the card's worker (or here), exit with its status."""
    setup_logging(log_file)
    if gpus not in (0, 1):
        raise ValueError(f"{stage}: resources gpu={gpus}; a stage uses at most one GPU")
    started = time.perf_counter()
    try:
        card = assign_gpu(stage, str(args.get("device", "auto"))) if gpus else None
    except Exception:
        log.exception("%s could not get a GPU after %.1f s", stage, time.perf_counter() - started)
        raise
    log.info("%s of %s on %s (job pid %d); %s", stage, key, socket.gethostname(), os.getpid(),
             card.describe() if card else "gpu: not requested")
    faults = os.environ.get(FAULT_ENV, "")
    try:
        if worker:
            status = run_in_worker(stage, key, args, faults, card, idle_s)
        else:
            status = _run_here(stage, key, args, faults)
    finally:
        if card:
            card.release()  # (a killed job releases it too: the kernel drops the flock)
    flush_job_output()
    if status:
        sys.exit(status)


def model_job(snakemake, stage: str) -> None:
    """run_model_job for a Snakemake `script:` job. The stage's arguments are the rule's named inputs
    and params (their names are the stage function's), its output as `out`, and `frugal` from a
    retry's resources. The worker settings come from the config, not params: they change how a row
    runs, not its result, so changing them reruns nothing."""
    args = {**dict(snakemake.input.items()), **dict(snakemake.params.items()), "out": snakemake.output[0]}
    if "frugal" in snakemake.resources.keys():
        args["frugal"] = bool(snakemake.resources.frugal)
    key = snakemake.wildcards.get("id") or snakemake.wildcards.get("prompt_key")
    run_model_job(stage, key, snakemake.log[0], args, gpus=snakemake.resources.get("gpu", 0),
                  worker=snakemake.config["worker"], idle_s=snakemake.config["worker_idle_s"])


def _run_here(stage: str, key: str, args: dict[str, Any], faults: str) -> int:
    from ..stages.context import StageContext

    os.environ.update(compiler_cache_env())
    hide_unused_packages()
    started = time.perf_counter()
    try:
        run_model_stage(stage, key, args, faults, StageContext())
    except Exception:
        log.exception("%s of %s failed after %.1f s", stage, key, time.perf_counter() - started)
        return 1
    return 0


def run_cpu_job(name: str, log_file: str | None, function: Callable[..., Any], key: str = "",
                **kwargs: Any) -> None:
    """A job without a model (mp4, pictures, gallery, model preparation): run it with logging; a
    failure is logged with its traceback and re-raised. `key`: the row, for TURBOWAN_INJECT_FAULT."""
    setup_logging(log_file)
    started = time.perf_counter()
    log.info("%s on %s (pid %d)", name, socket.gethostname(), os.getpid())
    try:
        inject(name, key, os.environ.get(FAULT_ENV, ""))
        function(**kwargs)
    except Exception:
        log.exception("%s failed after %.1f s", name, time.perf_counter() - started)
        raise
    log.info("%s done in %.1f s; peak host RSS %.2f GB", name, time.perf_counter() - started, host_rss_gb()[1])
