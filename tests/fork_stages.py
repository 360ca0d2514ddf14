"""Stages for tests/test_forkserver.py, run by name ("tests.fork_stages:...") as the model stages are."""

import json
import os
import signal
import sys
import time


def report(out: str, message: str = "") -> None:
    """Write what the process running the stage is and has, and print `message` to stdout."""
    torch = sys.modules.get("torch")
    facts = dict(pid=os.getpid(), ppid=os.getppid(), pgid=os.getpgid(0), cwd=os.getcwd(), argv=sys.argv,
                 torch_threads=torch.get_num_threads() if torch else None,
                 threads=os.environ.get("OMP_NUM_THREADS"), extra=os.environ.get("TURBOWAN_TEST_EXTRA"),
                 imported_diffusers_first="diffusers" in sys.modules)
    with open(out + ".partial", "w") as f:  # (whole or not at all: tests wait for the file to appear)
        json.dump(facts, f)
    os.replace(out + ".partial", out)
    print(message, flush=True)


def hold_memory(out: str) -> None:
    """Leave with 2 GB to give back: the kernel takes a while to tear such a process down."""
    report(out)
    hold_memory.block = bytearray(2 << 30)
    for i in range(0, len(hold_memory.block), 4096):
        hold_memory.block[i] = 1


def nap(out: str, seconds: float) -> None:
    report(out)
    time.sleep(seconds)


def fail(out: str) -> None:
    report(out)
    raise RuntimeError("this stage fails on purpose")


def sleep(out: str) -> None:
    report(out)
    time.sleep(60)


def die(out: str) -> None:
    """End as a dead node or the OOM killer would end a job."""
    report(out)
    os.kill(os.getpid(), signal.SIGKILL)


def use_cuda(out: str) -> None:
    """Start CUDA in the worker, as every model stage on a GPU does."""
    import torch

    report(out, f"cuda sum {(torch.ones(4, device='cuda') * 2).sum().item():.0f}")
