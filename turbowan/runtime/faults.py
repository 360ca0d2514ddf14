"""Failures on purpose, for drills and the fault-injection tests.

TURBOWAN_INJECT_FAULT="sample_low:row7,decode:row9" makes those stages of those rows fail (a row's
key is its id, or the prompt key for encode_prompt); "sample_low:row7:kill" instead SIGKILLs the
job's whole process group there, as a dead node or the kernel's OOM killer would; and
"sample_low:row7:hang" makes the row hang there (for up to HANG_S), as a stuck GPU would, until its
job is cancelled.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

FAULT_ENV = "TURBOWAN_INJECT_FAULT"
HANG_S = 600.0


def fault_for(stage: str, key: str, faults: str) -> str | None:
    """What `faults` (the variable's value) asks of this stage and row: None, "raise" or "kill"."""
    for item in faults.split(","):
        name, _, rest = item.strip().partition(":")
        wanted, _, how = rest.partition(":")
        if (name, wanted) == (stage, key):
            return how or "raise"
    return None


def kill_job() -> None:
    """SIGKILL this job's process group, as a node that died would."""
    logging.shutdown()
    os.killpg(os.getpgid(0), signal.SIGKILL)


def inject(stage: str, key: str, faults: str, kill: Callable[[], None] = kill_job,
           cancelled: Callable[[], bool] = lambda: False) -> None:
    """Fail (or hang, until `cancelled()`) here if `faults` says so."""
    how = fault_for(stage, key, faults)
    if how == "kill":
        kill()
    if how == "hang":
        deadline = time.monotonic() + HANG_S
        while not cancelled() and time.monotonic() < deadline:
            time.sleep(0.1)
    if how:
        raise RuntimeError(f"fault injected by {FAULT_ENV} for {stage}:{key}")
