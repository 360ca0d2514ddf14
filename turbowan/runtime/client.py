"""The job's side of a resident worker: find the card's worker (start it if there is none), send the
row, write the row's log lines as they come, and return the row's status. No torch here: a job
that only talks to a worker starts in a fraction of a second."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .faults import kill_job
from .logs import write_lines
from ..private import compiler_cache_env, private_dir
from .worker import ALREADY_SERVED, HEADER, code_fingerprint, connect, socket_path

log = logging.getLogger("turbowan.job")

START_TIMEOUT_S = 300.0  # a worker binds its socket at once; its imports then take seconds
POLL_S = 0.05


def worker_key(card) -> str:
    """Which worker serves a job: one per card (its UUID), per SLURM allocation, or "cpu"."""
    if card is None or card.how in ("cpu", "none"):
        return "cpu"
    if card.how == "slurm":
        return f"slurm-{card.slurm_job}-{card.visible}"
    if card.how == "pinned":
        return f"pinned-{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
    return card.card.uuid


def snakemake_pid() -> int | None:
    """The outermost Snakemake process above this job on this host (the run's own, or on SLURM the
    one inside the allocation): the worker ends when it does."""
    found, pid = None, os.getppid()
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if any(os.path.basename(a.decode(errors="replace")) == "snakemake" for a in argv[:2]) or (
                b"-m" in argv[:3] and b"snakemake" in argv[:4]):
            found = pid
        pid = parent
    return found


def _start_worker(path: Path, key: str, idle_s: float) -> tuple[subprocess.Popen, Path]:
    """A new worker for `key`, in a session of its own (a Ctrl-C of this job must not reach it)."""
    import turbowan

    worker_log = path.with_suffix(".log")
    package_root = str(Path(turbowan.__file__).resolve().parent.parent)
    env = {**os.environ, **compiler_cache_env(),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "turbowan.runtime.worker", "--socket", str(path), "--key", key,
           "--idle", str(idle_s), "--watch", str(snakemake_pid() or 0), "--log", str(worker_log)]
    process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    log.info("started a worker for %s (pid %d; its log: %s)", key, process.pid, worker_log)
    return process, worker_log


def _connect_or_start(path: Path, key: str, idle_s: float) -> socket.socket:
    conn = connect(path)
    if conn is not None:
        return conn
    process, worker_log = _start_worker(path, key, idle_s)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        conn = connect(path)
        if conn is not None:
            return conn
        code = process.poll()
        if code is not None and code != ALREADY_SERVED:
            tail = worker_log.read_text(errors="replace")[-2000:] if worker_log.exists() else ""
            raise RuntimeError(f"the worker for {key} exited with status {code} before serving:\n{tail}")
        time.sleep(POLL_S)
    raise RuntimeError(f"no worker for {key} answered on {path} within {START_TIMEOUT_S:.0f} s")


def _wait_until_ended(path: Path, timeout_s: float = 60.0) -> None:
    """Wait for a worker that said it is ending to let go of its lock."""
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the worker on {path} did not end within {timeout_s:.0f} s") from None
                time.sleep(POLL_S)
    finally:
        os.close(fd)


def run_in_worker(stage: str, key: str, args: dict[str, Any], faults: str, card, idle_s: float) -> int:
    """Run one row of `stage` in the card's worker; its exit status (0 = done)."""
    wkey = worker_key(card)
    path = socket_path(wkey)
    threads = os.environ.get("OMP_NUM_THREADS")
    request = {"stage": stage, "key": key, "args": args, "faults": faults, "cwd": os.getcwd(),
               "code": code_fingerprint(), "threads": int(threads) if threads and threads.isdigit() else None}
    payload = json.dumps(request).encode()
    for _ in range(3):
        conn = _connect_or_start(path, wkey, idle_s)
        answered = False
        with conn, conn.makefile("rb") as replies:
            try:
                conn.sendall(HEADER.pack(len(payload)) + payload)
                for raw in replies:
                    answered = True
                    message = json.loads(raw)
                    if "log" in message:
                        write_lines(message["log"])
                    elif message.get("kill"):
                        kill_job()
                    elif "status" in message:
                        return int(message["status"])
                    elif message.get("refused") == "stale":
                        log.info("the worker for %s runs other code (%s); starting a new one", wkey, message.get("why"))
                        break
                    elif "refused" in message:
                        log.error("the worker refused this job: %s", message["refused"])
                        return 1
            except (ConnectionResetError, BrokenPipeError):
                pass  # a worker that was ending when we connected, or one that died during the row
            if not answered:
                time.sleep(POLL_S)  # it had not started this row: ask again (a new worker, if need be)
                continue
            if "refused" not in message:
                log.error("%s of %s: the worker for %s ended without finishing the row (it crashed or was "
                          "killed; see %s); the next job starts a new one", stage, key, wkey, path.with_suffix(".log"))
                return 1
        _wait_until_ended(path)
    log.error("could not get a current worker for %s", wkey)
    return 1
