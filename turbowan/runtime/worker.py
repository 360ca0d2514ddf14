"""A resident model worker: one long-lived process per GPU card (one on a CPU-only machine) that
runs the model stages of the jobs sent to it, one row at a time, and keeps what it loaded.

Loading a 14B expert takes seconds to minutes and importing torch, diffusers and transformers
seconds more; a job per row that paid both would spend most of its time starting. So the first
job that needs a card starts its worker (turbowan.runtime.client), and later jobs hand it their
rows. The worker keeps its imports and a StageContext whose model cache keeps models loaded
within the card's memory budget (one model at a time on a card under 40 GB).

Who may talk to it: the socket lives in a private per-user folder (turbowan.private),
the worker checks every peer's uid (SO_PEERCRED) and serves only its own user, a request names
one of the pipeline's model stages (turbowan.stages.MODEL_STAGES, nothing else), and a request
larger than MAX_REQUEST_BYTES is refused unread. Environment values never reach the log.

When it ends: after `--idle` seconds without a job, when the process it watches (the Snakemake
that started the jobs) is gone, or with the SLURM allocation it runs in. A job whose connection
closes (Ctrl-C, SIGKILL, scancel) stops its row at the next sampling step or before its output
is written; an error or an out-of-memory in a row fails that row's job, and the worker frees what
the row held and serves the next.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .logs import LOG_FORMAT
from ..private import private_dir

log = logging.getLogger("turbowan.worker")

MAX_REQUEST_BYTES = 1 << 20
HEADER = struct.Struct(">Q")  # a request's length, before its JSON
REQUEST_TIMEOUT_S = 10.0  # a connected peer has this long to send its request
ALREADY_SERVED = 3  # exit status of a worker that found another one serving its card


def code_fingerprint(package: Path = Path(__file__).resolve().parent.parent) -> str:
    """Changes when the Python or any turbowan module changes: a worker that imported other code than
    the job's must not serve it."""
    digest = hashlib.sha256(sys.executable.encode())
    for file in sorted(package.rglob("*.py")):
        stat = file.stat()
        digest.update(f"{file.relative_to(package)}:{stat.st_mtime_ns}:{stat.st_size}".encode())
    return digest.hexdigest()[:16]


def socket_path(key: str) -> Path:
    """The socket of this host's worker for `key` (a card, or "cpu"). Hashed: a socket path must stay
    under 108 bytes, and card UUIDs are long."""
    name = hashlib.sha256(f"{socket.gethostname()}:{key}".encode()).hexdigest()[:20]
    return private_dir("workers") / f"{name}.sock"


@contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for `path` that fits AF_UNIX's 108 bytes: the path itself, or the same file reached
    through an open descriptor of its folder (a deep home folder would be too long otherwise)."""
    if len(os.fsencode(str(path))) < 100:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


def connect(path: Path) -> socket.socket | None:
    """A connection to the worker at `path`, or None when none listens there."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with unix_address(path) as address:
            conn.connect(address)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    return conn


def send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 16))
        if not chunk:
            raise ConnectionError("the job closed the connection before its request was complete")
        data += chunk
    return bytes(data)


class RequestRefused(ValueError):
    pass


def read_request(conn: socket.socket, stages) -> dict[str, Any]:
    """The job's request, checked: size, shape, and a stage the pipeline has."""
    (length,) = HEADER.unpack(_recv_exactly(conn, HEADER.size))
    if length > MAX_REQUEST_BYTES:
        raise RequestRefused(f"request of {length} bytes is over the {MAX_REQUEST_BYTES}-byte limit")
    try:
        request = json.loads(_recv_exactly(conn, length))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestRefused(f"request is not JSON ({err})") from None
    if not isinstance(request, dict) or not isinstance(request.get("args"), dict) \
            or not isinstance(request.get("cwd"), str):
        raise RequestRefused("request is not an object with args and cwd")
    if request.get("stage") not in stages:
        raise RequestRefused(f"{str(request.get('stage'))[:80]!r} is not one of the pipeline's model stages")
    return request


def _refuse(conn: socket.socket, why: str) -> None:
    """Say why, then let the job read it: closing a socket with unread bytes in it would reset the
    connection before the job saw the answer. What the job sent is drained, a bounded amount."""
    try:
        send(conn, {"refused": why})
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        drained = 0
        while drained < MAX_REQUEST_BYTES and (chunk := conn.recv(1 << 16)):
            drained += len(chunk)
    except OSError:
        pass


class _ToJob(logging.Handler):
    """Sends each log record of the row to the job, which writes it to the job's log."""

    def __init__(self, conn: socket.socket, cancel: threading.Event):
        super().__init__()
        self.conn, self.cancel = conn, cancel
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            send(self.conn, {"log": self.format(record)})
        except OSError:  # the job is gone: the row stops at its next check
            self.cancel.set()


def _closed(conn: socket.socket) -> bool:
    """Whether the job has closed its end already (checked without waiting)."""
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _watch_connection(conn: socket.socket, cancel: threading.Event, done: threading.Event) -> None:
    """Set `cancel` when the job closes its end (it sends nothing after its request)."""
    while not done.is_set():
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable:
            try:
                if not conn.recv(4096):
                    cancel.set()
                    return
            except OSError:
                cancel.set()
                return


class Worker:
    def __init__(self, path: Path, key: str, idle_s: float, watch_pid: int | None):
        self.path, self.key, self.idle_s, self.watch_pid = path, key, idle_s, watch_pid
        self.fingerprint = code_fingerprint()
        self.ctx = None
        self.ending = False

    def serve(self) -> int:
        try:
            watched = _pidfd(self.watch_pid)
        except ProcessLookupError:
            log.info("pid %d, which this worker would serve, has ended already", self.watch_pid)
            return 0
        lock = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another worker serves %s already", self.key)
            return ALREADY_SERVED
        self.path.unlink(missing_ok=True)  # a dead worker's socket (we hold the lock: none lives)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with unix_address(self.path) as address:
            listener.bind(address)
        os.chmod(self.path, 0o600)
        listener.listen(16)
        bound = os.stat(self.path).st_ino
        log.info("worker for %s (pid %d) on %s; ends after %.0f s idle%s", self.key, os.getpid(), self.path,
                 self.idle_s, f" or when pid {self.watch_pid} ends" if self.watch_pid else "")
        self._preload()
        try:
            while not self.ending:
                ready, _, _ = select.select([listener] + ([watched] if watched is not None else []), [], [],
                                            self.idle_s)
                if not ready:
                    log.info("idle for %.0f s: ending", self.idle_s)
                    break
                if watched is not None and watched in ready:
                    log.info("pid %d ended: ending", self.watch_pid)
                    break
                conn, _ = listener.accept()
                with conn:
                    self.handle(conn)
        finally:
            if os.path.exists(self.path) and os.stat(self.path).st_ino == bound:
                self.path.unlink()
            listener.close()
        return 0

    def _preload(self) -> None:
        """What every model stage imports, once (and the StageContext that outlives the jobs)."""
        started = time.perf_counter()
        from ..stages import MODEL_STAGES, model_stage
        from .rows import hide_unused_packages

        hide_unused_packages()
        from ..stages.context import StageContext

        for name in MODEL_STAGES:
            model_stage(name)
        self.ctx = StageContext()
        log.info("imports done in %.1f s", time.perf_counter() - started)

    def handle(self, conn: socket.socket) -> None:
        from ..stages import MODEL_STAGES

        if peer_uid(conn) != os.getuid():
            log.warning("refused a connection from uid %d (this worker serves uid %d only)", peer_uid(conn), os.getuid())
            return
        conn.settimeout(REQUEST_TIMEOUT_S)
        try:
            request = read_request(conn, MODEL_STAGES)
        except (RequestRefused, ConnectionError, OSError, struct.error) as err:
            log.warning("refused a request: %s", err)
            _refuse(conn, str(err))
            return
        conn.settimeout(None)
        if request.get("code") != self.fingerprint:
            send(conn, {"refused": "stale", "why": "this worker runs other turbowan code or another Python"})
            self.ending = True
            return
        self.run(conn, request)

    def run(self, conn: socket.socket, request: dict[str, Any]) -> None:
        import torch

        from ..stages.context import Cancelled, release
        from .rows import run_model_stage

        stage, key = request["stage"], str(request.get("key", ""))
        self.ctx.cancel.clear()
        done = threading.Event()
        relay = _ToJob(conn, self.ctx.cancel)
        root = logging.getLogger()
        root.addHandler(relay)
        if _closed(conn):  # the job is gone already: its row does not start
            self.ctx.cancel.set()
        watcher = threading.Thread(target=_watch_connection, args=(conn, self.ctx.cancel, done), daemon=True)
        watcher.start()
        if request.get("threads"):
            torch.set_num_threads(int(request["threads"]))

        def kill() -> None:  # a drill's "kill": the job kills itself, this row stops as after any kill
            send(conn, {"kill": True})
            raise Cancelled("the job was killed (fault injected)")

        started = time.perf_counter()
        status = 0
        log.info("%s of %s in worker pid %d (%d model(s) resident)", stage, key, os.getpid(), len(self.ctx.models))
        try:
            os.chdir(request["cwd"])  # the job's relative paths are relative to its folder
            run_model_stage(stage, key, request["args"], str(request.get("faults", "")), self.ctx, on_kill=kill)
        except Exception:  # noqa: BLE001 - a row's error fails its job, not the worker
            status = 1
            log.exception("%s of %s failed after %.1f s", stage, key, time.perf_counter() - started)
            release(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        finally:
            done.set()
            root.removeHandler(relay)
        try:
            send(conn, {"status": status})
        except OSError:
            pass
        watcher.join()


def _pidfd(pid: int | None):
    """Something select() sees readable when `pid` ends (a pidfd), or None (nothing to watch, or no
    pidfds on this system: then idle time alone ends the worker). ProcessLookupError: it has ended."""
    if not pid:
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except (AttributeError, OSError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A resident model worker (started by the pipeline's jobs).")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--idle", type=float, default=300.0)
    parser.add_argument("--watch", type=int, default=0)
    parser.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True, format=LOG_FORMAT)
    status = Worker(Path(args.socket), args.key, args.idle, args.watch or None).serve()
    logging.shutdown()
    os._exit(status)  # (a normal exit of a process holding CUDA models takes seconds)


if __name__ == "__main__":
    main()
