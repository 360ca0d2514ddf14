"""Model jobs without their imports: a fork server for local runs.

A model job starts Python and imports torch and then diffusers or transformers before it can load
its model: 4-7 s a job on an H100 host (BENCHMARKS.md), five jobs per group of rows. In a local run
the workflow starts one server process (the Snakefile's `onstart`) that imports them once and
waits. A model job's own process then asks the server for a copy of itself (`fork`, a fraction of
a second), and that worker runs the stage. The job is still one Snakemake job with its own log:
its process hands the worker its standard streams, environment, working directory and arguments,
waits, and ends with the worker's exit status. The worker ends as soon as the job's process does,
so Snakemake cancelling or killing a job stops its worker too.

The server never loads a model, never initialises CUDA and starts no thread beyond the one
`import torch` starts (as a DataLoader's forked workers have it): that is what makes `fork` safe,
and it checks both before every fork. A worker joins its job's process group and takes the job's
thread count, so signals and CPU results are the job's own. Whenever the server cannot serve a job
exactly as the job would run on its own (no server, a server of other turbowan code or of another
environment, no answer), the job imports and runs in its own process as before, and its log says
why.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .jobs import flush_job_output, hide_unused_packages, resolve_stage, run_stage

log = logging.getLogger("turbowan.forkserver")

# The server's socket, for the jobs Snakemake starts (they inherit its environment).
SOCKET_ENV = "TURBOWAN_FORK_SERVER"

# What every model stage imports, imported once by the server. turbodiffusion (SLA, int8 linears)
# and Inductor (torch.compile of the experts) only where they are installed and used.
PRELOAD = (
    "turbowan.stages",
    "diffusers:WanTransformer3DModel",
    "diffusers:AutoencoderKLWan",
    "transformers:UMT5EncoderModel",
    "transformers:AutoTokenizer",
)
OPTIONAL_PRELOAD = ("turbodiffusion", "turbodiffusion.ops", "torch._inductor.compile_fx")

# Variables that Snakemake sets per job and nothing reads at import time: a job whose environment
# differs from the server's only in these is served (its worker takes the job's values). Any other
# difference could have changed how a library set itself up on import, so such a job imports its own.
PER_JOB_ENV = frozenset({
    "OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",  # Snakemake: the rule's threads
    "TMPDIR", "TMP", "TEMP", "TEMPDIR",  # Snakemake: the tmpdir resource
    "CUDA_VISIBLE_DEVICES",  # read when CUDA starts, in the worker (turbowan.runtime.gpus sets it there)
    "_", "PWD", "OLDPWD", "SHLVL",  # the shell that started the job
})

CONNECT_TIMEOUT_S = 5.0
# How long a job waits for the server's answer: it may still be importing (5-10 s on a GPU host).
ANSWER_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 10.0  # how long the server waits for a connected job's request
POLL_S = 0.5  # the server checks that its parent is there this often


# --- the job's side -------------------------------------------------------------------------------

def code_fingerprint(package_dir: str | Path = Path(__file__).parent) -> str:
    """Changes whenever a turbowan module is edited, added or removed: a server that imported other
    code than the job's would run the wrong stage."""
    files = sorted(Path(package_dir).glob("*.py"))
    return ";".join(f"{f.name}:{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in files)


def _standard_streams() -> list[int]:
    """The job's stdin, stdout and stderr, for the worker; /dev/null for one that is closed."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _read(replies: BinaryIO) -> dict | None:
    line = replies.readline()
    return json.loads(line) if line else None


def _exit_code(status: int) -> int:
    """A worker's status as a shell reports it: its exit code, or 128 + the signal that killed it."""
    return 128 - status if status < 0 else status


def serve_job(name: str, log_file: str | None, stage: str, kwargs: dict[str, Any]) -> tuple[int | None, str]:
    """Run the stage in a worker of the fork server named by $TURBOWAN_FORK_SERVER and wait for it.

    Returns (the worker's exit code, "") when the server ran it, or (None, why not) when the caller
    is to run the stage itself: nothing has started then.
    """
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None, "no fork server"
    request = dict(name=name, log_file=log_file, stage=stage, kwargs=kwargs, cwd=os.getcwd(), pgid=os.getpgid(0),
                   env=dict(os.environ), argv=sys.argv, executable=sys.executable, code=code_fingerprint())
    try:
        payload = json.dumps(request).encode()
    except (TypeError, ValueError) as err:
        return None, f"fork server not used: the stage's arguments are not JSON ({err})"
    if json.loads(payload)["kwargs"] != kwargs:  # (a tuple comes back a list)
        return None, "fork server not used: the stage's arguments do not come back the same from JSON"
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(CONNECT_TIMEOUT_S)
        conn.connect(path)
        socket.send_fds(conn, [b"J"], _standard_streams())
        conn.sendall(len(payload).to_bytes(8, "big") + payload)
        conn.settimeout(ANSWER_TIMEOUT_S)
        replies = conn.makefile("rb")
        answer = _read(replies)
    except (OSError, ValueError) as err:
        conn.close()
        return None, f"fork server {path} not usable ({err})"
    if not answer or "pid" not in answer:
        conn.close()
        return None, f"fork server refused: {(answer or {}).get('refused', 'no answer')}"
    conn.settimeout(None)  # the stage takes as long as it takes
    # The job ends once the server has reaped its worker: by then the worker's GPU memory and card
    # lock are free for the next job, as when a job's own process has ended. The worker says its
    # status as it exits too, which counts only if the server is gone (stopped mid-job).
    said = None
    while (message := _read(replies)) is not None and "status" not in message:
        said = message.get("ending", said)
    conn.close()
    if message is not None:
        return _exit_code(message["status"]), ""
    if said is not None:
        return said, ""
    print(f"{name}: the fork server's worker (pid {answer['pid']}) ended without a status: the server "
          "was stopped while it ran; the stage's result is unknown", file=sys.stderr)
    return 1, ""


# --- the server's side ----------------------------------------------------------------------------

def import_each() -> Iterator[str]:
    """Import what the model stages import, one PRELOAD or OPTIONAL_PRELOAD entry at a time, and
    yield each once imported (an optional one that is not installed is skipped)."""
    hide_unused_packages()
    for spec in PRELOAD + OPTIONAL_PRELOAD:
        module, _, attribute = spec.partition(":")
        try:
            imported = importlib.import_module(module)
            if attribute:
                getattr(imported, attribute)  # (diffusers and transformers import their classes lazily)
        except ImportError:
            if spec in PRELOAD:
                raise
            continue
        yield spec


def os_threads() -> int:
    """Threads of this process, Python's and native ones (OpenMP's, CUDA's); Python's alone where
    there is no /proc (not Linux)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except FileNotFoundError:
        return threading.active_count()


def thread_names() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        except OSError:
            pass
    return names


def cuda_after_fork() -> str:
    """"" if a forked child can still start CUDA, else why not. torch forbids it in a child once
    the parent asked the driver for its devices (diffusers' import calls torch.cuda.is_available());
    serve() has torch ask NVML instead, which leaves no such mark. This forks a child to see."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch._C, "_cuda_isInBadFork"):
        return ""
    pid = os.fork()
    if pid == 0:
        os._exit(1 if torch._C._cuda_isInBadFork() else 0)
    _, status = os.waitpid(pid, 0)
    return "" if os.waitstatus_to_exitcode(status) == 0 else "a forked child could not start CUDA"


def _refusal(request: dict, code: str, env: dict[str, str], threads: int) -> str:
    """Why this server must not run the request ("" if it may). `threads`: os_threads() once it
    had imported (`import torch` starts one, which may have ended since)."""
    if request.get("code") != code:
        return "the turbowan code changed since the fork server started"
    if request.get("executable") != sys.executable:
        return f"the job runs {request.get('executable')}, the fork server {sys.executable}"
    job_env = request.get("env", {})
    differ = sorted(k for k in set(env) | set(job_env) if env.get(k) != job_env.get(k) and k not in PER_JOB_ENV)
    if differ:
        return ("the job's environment differs from the fork server's in "
                + ", ".join(f"{k} ({_env_value(job_env, k)} against {_env_value(env, k)})" for k in differ[:5]))
    if threading.active_count() != 1 or os_threads() > threads:
        return f"the fork server runs {os_threads()} threads, more than its {threads} after import, so fork is not safe"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialised in the fork server, so fork is not safe"
    return ""


def _env_value(env: dict[str, str], name: str) -> str:
    value = env.get(name)
    return "unset" if value is None else repr(value if len(value) <= 40 else value[:37] + "...")


def _receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    _, fds, _, _ = socket.recv_fds(conn, 1, 3)
    try:
        if len(fds) != 3:
            raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
        with conn.makefile("rb") as reader:  # (read(n) waits for all n bytes, or the end)
            size = int.from_bytes(reader.read(8), "big")
            payload = reader.read(size)
        if len(payload) != size:
            raise ValueError("the job closed the connection mid-request")
        return json.loads(payload), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _job_is_gone(conn: socket.socket) -> bool:
    """Whether the job's process has closed its end (it stopped waiting for the server, or died).
    A job sends nothing after its request, so its end is readable only once it has closed."""
    readable, _, _ = select.select([conn], [], [], 0)  # (no wait: recv would wait out the timeout)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _end_with_the_job(conn: socket.socket, ending: threading.Event) -> None:
    """End this worker as soon as the job's process has gone (Snakemake cancelled or killed it):
    its end of the connection closes then. Not once the worker is `ending` on its own."""
    def watch() -> None:
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        if not ending.is_set():
            os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="job-watch", daemon=True).start()


def _threads_as_the_job_would() -> None:
    """torch's CPU threads from the job's OMP_NUM_THREADS (Snakemake sets the rule's threads), as
    torch would take them in the job's own process: CPU convolutions round differently with more."""
    torch = sys.modules.get("torch")
    wanted = os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS") or ""
    if torch is not None and wanted.isdigit() and int(wanted) > 0:
        torch.set_num_threads(int(wanted))


def _work(conn: socket.socket, fds: list[int], request: dict) -> None:
    """In the forked worker: become the job's process, run the stage, report, exit. Never returns."""
    status = 1
    ending = threading.Event()
    try:
        try:  # the job's process group: what reaches the job's group (Ctrl-C, a drill's kill) reaches it
            os.setpgid(0, request["pgid"])
        except OSError:  # (a job in another session than Snakemake's)
            os.setsid()
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        tempfile.tempdir = None  # (the job's TMPDIR)
        _threads_as_the_job_would()
        conn.settimeout(None)
        _end_with_the_job(conn, ending)
        run_stage(request["name"], request["log_file"], resolve_stage(request["stage"]),
                  process_note=f"a worker of the fork server (pid {os.getppid()})", **request["kwargs"])
        status = 0
    except BaseException:  # (the stage's own failure is in its log already; this is the job's stderr)
        traceback.print_exc()
    finally:
        ending.set()
        flush_job_output()
        try:
            _send(conn, {"ending": status})
        except OSError:
            pass
        os._exit(status)


@dataclass
class _Server:
    """What the server's loop keeps: its socket, the pipe a worker's end (SIGCHLD) wakes it by,
    the connection of each running worker's job, and what it checks requests against."""

    listener: socket.socket
    wakeup: tuple[int, int]  # (read end, write end)
    code: str  # code_fingerprint()
    env: dict[str, str]  # the environment jobs have
    threads: int  # os_threads() after the imports
    broken: str  # cuda_after_fork()
    workers: dict[int, socket.socket] = field(default_factory=dict)


def _serve_one(server: _Server, conn: socket.socket) -> None:
    """Read one job's request and fork its worker, or tell the job why not."""
    try:
        conn.settimeout(REQUEST_TIMEOUT_S)
        request, fds = _receive_request(conn)
    except (OSError, ValueError) as err:
        log.warning("a job's request could not be read: %s", err)
        conn.close()
        return
    why_not = server.broken or _refusal(request, server.code, server.env, server.threads)
    if not why_not and _job_is_gone(conn):  # (it gave up waiting and runs the stage itself)
        why_not = "the job had stopped waiting"
    if why_not:
        log.info("refused %s: %s", request.get("name"), why_not)
        for fd in fds:
            os.close(fd)
        try:
            _send(conn, {"refused": why_not})
        except OSError:
            pass
        conn.close()
        return
    pid = os.fork()
    if pid == 0:  # the worker: nothing of the server's but the imports
        signal.set_wakeup_fd(-1)
        server.listener.close()
        for fd in server.wakeup:
            os.close(fd)
        for other in server.workers.values():
            other.close()
        _work(conn, fds, request)
    for fd in fds:
        os.close(fd)
    log.info("%s (%s) runs in worker %d", request["name"], request.get("log_file"), pid)
    server.workers[pid] = conn
    try:
        _send(conn, {"pid": pid})
    except OSError:
        pass  # the job has gone already: its worker sees that and ends


def _reap(server: _Server) -> None:
    """Tell the jobs of the workers that have ended (and been reaped) how they ended."""
    while server.workers:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        log.info("worker %d ended: %s", pid, f"exit {code}" if code >= 0 else f"signal {-code}")
        conn = server.workers.pop(pid, None)
        if conn is not None:
            try:
                _send(conn, {"status": code})
            except OSError:
                pass
            conn.close()


def serve(path: str, parent: int) -> None:
    """The server: listen on `path`, import, then fork a worker per job until its `parent` (the
    Snakemake process that started it) has gone or it is sent SIGTERM."""
    env = dict(os.environ)  # as the jobs have it (Inductor's import adds TORCHINDUCTOR_CACHE_DIR)
    # torch.cuda.is_available() by NVML: asking the CUDA driver would forbid CUDA in every worker
    # (cuda_after_fork). A worker takes the job's environment, without this.
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # (jobs may connect while it imports: they wait in the backlog)
    listener.listen(64)
    started = time.perf_counter()
    imported = list(import_each())
    log.info("imported %s in %.1f s; serving %s (pid %d)", ", ".join(imported), time.perf_counter() - started,
             path, os.getpid())
    wakeup = os.pipe()
    for fd in wakeup:
        os.set_blocking(fd, False)
    server = _Server(listener, wakeup, code_fingerprint(), env, os_threads(), cuda_after_fork())
    log.info("threads after import: %s%s", ", ".join(thread_names()),
             f"; {server.broken}: every job imports its own" if server.broken else "")
    signal.set_wakeup_fd(wakeup[1])
    signal.signal(signal.SIGCHLD, lambda *_: None)  # (a worker's end wakes the select at once)
    try:
        while os.getppid() == parent:
            ready, _, _ = select.select([listener, wakeup[0]], [], [], POLL_S)
            if wakeup[0] in ready:
                os.read(wakeup[0], 4096)  # (a byte per signal; _reap takes every ended worker)
            _reap(server)
            if listener in ready:
                conn, _ = listener.accept()
                _serve_one(server, conn)
    finally:
        listener.close()
    log.info("Snakemake has ended; so does the fork server")


# --- starting and stopping it (the Snakefile's onstart, onsuccess and onerror) --------------------

def start(log_file: str | Path) -> str:
    """Start a server beside this process (Snakemake) and point the jobs it starts at it; returns
    its socket path. The socket lies in a private folder (only this user can connect): a short
    path under the temporary folder, since a socket's path may not exceed 107 bytes."""
    folder = tempfile.mkdtemp(prefix="turbowan-fork-")
    path = os.path.join(folder, "socket")
    os.environ[SOCKET_ENV] = path  # (before the server starts: its environment is the jobs')
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    package_root = str(Path(__file__).resolve().parent.parent)
    command = f"import sys; sys.path.insert(0, {package_root!r}); from turbowan.forkserver import main; main()"
    with open(log_file, "w") as out:
        # env: os.environ, as Snakemake gives its jobs (the C library's environment, which a child
        # gets by default, can hold more: COLUMNS and LINES under pytest). Snakemake's session and
        # process group, as its jobs: a worker can join its job's group (the server ignores Ctrl-C).
        server = subprocess.Popen([sys.executable, "-c", command, path, str(os.getpid())], env=dict(os.environ),
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    Path(folder, "pid").write_text(str(server.pid))
    return path


def stop() -> None:
    """Stop the server that start() started, if any, and remove its folder."""
    path = os.environ.pop(SOCKET_ENV, None)
    if not path:
        return
    folder = os.path.dirname(path)
    try:
        pid = int(Path(folder, "pid").read_text())
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):  # reap it (it is this process's child) rather than leave a zombie
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
    except (OSError, ValueError):  # (gone already, or not this process's child)
        pass
    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops Snakemake and its jobs; it ends with them
    serve(sys.argv[1], parent=int(sys.argv[2]))


if __name__ == "__main__":
    main()
