"""The resident model worker and its job-side client, on the CPU with the demo models: who may talk to
it, what it runs, and what happens when a job or the worker itself goes away."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import tempfile
import time
from pathlib import Path

import pytest
import torch

from turbowan.runtime import client, worker
from turbowan.runtime.worker import HEADER, MAX_REQUEST_BYTES, code_fingerprint
from turbowan.stages.context import Cancelled, StageContext
from turbowan.wan.sampler import initial_state, run_steps
from turbowan.wan.schedule import rcm_timesteps

from .conftest import REPO, alive, prompt_sheet

SECOND_UID = 65534  # nobody


@pytest.fixture
def private_home(tmp_path, monkeypatch):
    """Private folders (sockets, locks, caches) of this test alone."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # (torch may have set them in this process)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def prompt_job(private_home, demo_models):
    """The args of an encode_prompt row (the quickest model stage)."""
    sheet, key = prompt_sheet(private_home, "a lighthouse in fog")

    def args(out="text.safetensors"):
        return {"sheet": sheet, "prompt_key": key, "text_encoder": demo_models["text_encoder"],
                "tokenizer": demo_models["tokenizer"], "out": out, "device": "cpu"}

    return args


def request(stage, args, **extra):
    return {"stage": stage, "key": "row", "args": args, "faults": "", "cwd": os.getcwd(), "code": code_fingerprint(),
            "threads": 1, **extra}


def exchange(path: Path, message: bytes) -> list[dict]:
    """Send raw bytes as a job would; every reply until the worker closes."""
    with worker.connect(path) as conn:
        conn.sendall(message)
        with conn.makefile("rb") as replies:
            return [json.loads(line) for line in replies]


def encoded(req: dict) -> bytes:
    payload = json.dumps(req).encode()
    return HEADER.pack(len(payload)) + payload


def worker_pid(path: Path) -> int:
    with worker.connect(path) as conn:
        pid, _, _ = __import__("struct").unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid


@pytest.fixture
def running_worker(private_home):
    """A worker for key "cpu" started the way a job starts it; stopped at the end."""
    path = worker.socket_path("cpu")
    conn = client._connect_or_start(path, "cpu", idle_s=60)
    conn.close()
    pid = worker_pid(path)
    yield path, pid
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_a_job_starts_the_worker_which_serves_later_jobs_with_its_models_loaded(prompt_job, running_worker):
    path, pid = running_worker
    first = exchange(path, encoded(request("encode_prompt", prompt_job("one.safetensors"))))
    second = exchange(path, encoded(request("encode_prompt", prompt_job("two.safetensors"))))
    assert first[-1] == {"status": 0} and second[-1] == {"status": 0}
    first_log, second_log = ("\n".join(m["log"] for m in replies if "log" in m) for replies in (first, second))
    assert f"in worker pid {pid}" in first_log and "loading text encoder" in first_log
    assert "loading text encoder" not in second_log and "(1 model(s) resident)" in second_log
    assert Path("one.safetensors").read_bytes() == Path("two.safetensors").read_bytes()
    # private: the socket and its folder are this user's alone
    assert (path.stat().st_mode & 0o777) == 0o600 and (path.parent.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("stage", ["os:system", "turbowan.stages.prompt:encode_prompt", "encode_video", ""])
def test_a_request_naming_anything_but_a_model_stage_is_refused(prompt_job, running_worker, stage):
    path, pid = running_worker
    replies = exchange(path, encoded(request(stage, {"command": "touch pwned"})))
    assert len(replies) == 1 and "is not one of the pipeline's model stages" in replies[0]["refused"]
    assert not Path("pwned").exists()
    assert exchange(path, encoded(request("encode_prompt", prompt_job())))[-1] == {"status": 0}  # still serving
    assert alive(pid)


def test_an_oversized_request_is_refused_unread_and_the_worker_goes_on(prompt_job, running_worker):
    path, pid = running_worker
    replies = exchange(path, HEADER.pack(2**62) + b"{}")
    assert f"over the {MAX_REQUEST_BYTES}-byte limit" in replies[0]["refused"]
    replies = exchange(path, HEADER.pack(10) + b"not json!!")
    assert "not JSON" in replies[0]["refused"]
    assert exchange(path, encoded(request("encode_prompt", prompt_job())))[-1] == {"status": 0}
    assert alive(pid)


def test_a_worker_of_other_code_steps_aside_for_a_current_one(prompt_job, running_worker):
    path, old = running_worker
    replies = exchange(path, encoded(request("encode_prompt", prompt_job(), code="not-this-code")))
    assert replies == [{"refused": "stale", "why": "this worker runs other turbowan code or another Python"}]
    deadline = time.monotonic() + 30
    while alive(old) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(old)
    assert client.run_in_worker("encode_prompt", "row", prompt_job(), "", None, idle_s=30) == 0
    new = worker_pid(path)
    assert new != old
    os.kill(new, signal.SIGKILL)


def test_a_rows_error_fails_its_job_and_the_worker_serves_the_next(prompt_job, running_worker):
    path, pid = running_worker
    broken = {**prompt_job(), "text_encoder": "missing.safetensors"}
    replies = exchange(path, encoded(request("encode_prompt", broken)))
    assert replies[-1] == {"status": 1}
    assert any("missing.safetensors" in m.get("log", "") for m in replies)
    faulty = exchange(path, encoded(request("encode_prompt", prompt_job(), faults="encode_prompt:row")))
    assert faulty[-1] == {"status": 1} and any("fault injected" in m.get("log", "") for m in faulty)
    assert exchange(path, encoded(request("encode_prompt", prompt_job())))[-1] == {"status": 0}
    assert alive(pid)


def test_a_job_that_is_gone_before_its_row_starts_writes_nothing(prompt_job, running_worker):
    path, pid = running_worker
    with worker.connect(path) as conn:
        conn.sendall(encoded(request("encode_prompt", prompt_job("gone.safetensors"))))
    assert exchange(path, encoded(request("encode_prompt", prompt_job())))[-1] == {"status": 0}  # served after it
    assert not Path("gone.safetensors").exists()
    assert "Cancelled: the job was cancelled" in (path.with_suffix(".log")).read_text()


def test_a_cancelled_row_stops_at_the_next_step():
    ctx = StageContext()
    calls = []

    def velocity(x, t):
        calls.append(float(t))
        ctx.cancel.set()  # the job goes away during the first step
        return torch.zeros_like(x)

    t = rcm_timesteps(4, 200.0)
    state = initial_state((1, 16, 1, 2, 2), 0, t, "cpu")
    with pytest.raises(Cancelled):
        run_steps(state, velocity, t, 4, True, "high", before_step=ctx.check)
    assert len(calls) == 1


def test_a_worker_that_dies_fails_the_row_in_flight_and_the_next_job_starts_a_new_one(prompt_job, running_worker):
    path, pid = running_worker
    with worker.connect(path) as conn:
        conn.sendall(encoded(request("encode_prompt", prompt_job("x.safetensors"))))
        with conn.makefile("rb") as replies:
            first = json.loads(replies.readline())  # the row has started
            assert "log" in first
            os.kill(pid, signal.SIGKILL)
            rest = [json.loads(line) for line in replies]
    assert not any("status" in m for m in rest)
    assert client.run_in_worker("encode_prompt", "row", prompt_job(), "", None, idle_s=30) == 0
    new = worker_pid(path)
    assert new != pid
    os.kill(new, signal.SIGKILL)


def test_a_worker_ends_when_idle(private_home):
    path = worker.socket_path("cpu")
    conn = client._connect_or_start(path, "cpu", idle_s=1)
    conn.close()
    pid = worker_pid(path)
    deadline = time.monotonic() + 60
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid) and not path.exists()
    assert "idle for 1 s: ending" in path.with_suffix(".log").read_text()


def test_a_worker_ends_with_the_process_it_watches(private_home):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    path = worker.socket_path("cpu")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "turbowan.runtime.worker", "--socket", str(path), "--key", "cpu",
                             "--idle", "600", "--watch", str(sleeper.pid), "--log", str(path.with_suffix(".log"))],
                            env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists()
    sleeper.kill()
    sleeper.wait()
    assert proc.wait(timeout=60) == 0
    assert f"pid {sleeper.pid} ended: ending" in path.with_suffix(".log").read_text()


def run_as(uid: int, code: str, env: dict) -> subprocess.CompletedProcess:
    """Python code run as another user (the system's Python: the venv's may sit in root's home)."""
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", python, "-c", code],
                          env=env, capture_output=True, text=True, timeout=120)


needs_root = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("TURBOWAN_REQUIRE_SLURM") != "1",
                                reason="acting as a second user needs root (CI runs as root)")


@needs_root
def test_another_user_cannot_reach_the_worker(prompt_job, running_worker, tmp_path):
    """The socket's folder keeps other users out; and were the socket reachable (an open folder), the
    worker still refuses them by their uid."""
    path, pid = running_worker
    code = ("import os, socket\n"
            f"path = {str(path)!r}\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    folder = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)\n"
            "    s.connect(f'/proc/self/fd/{folder}/{os.path.basename(path)}')\n"
            "except PermissionError:\n"
            "    print('refused by permissions')\n")
    out = run_as(SECOND_UID, code, {"PATH": os.environ["PATH"]})
    assert "refused by permissions" in out.stdout, out.stdout + out.stderr

    # a socket anyone could reach (an open folder in /tmp, an open socket): only the uid check is left
    shared = Path(tempfile.mkdtemp(prefix="tw-open-", dir="/tmp"))
    os.chmod(shared, 0o777)
    open_path = shared / "w.sock"
    server = worker.Worker(open_path, "cpu", idle_s=60, watch_pid=None)
    server._preload = lambda: setattr(server, "ctx", StageContext())
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while (probe := worker.connect(open_path)) is None and time.monotonic() < deadline:
        time.sleep(0.02)  # (listening: its own chmod 0600 is done)
    probe.close()
    os.chmod(open_path, 0o777)
    payload = encoded(request("encode_prompt", prompt_job("theirs.safetensors")))
    code = ("import socket, sys\n"
            f"s = socket.socket(socket.AF_UNIX); s.connect({str(open_path)!r})\n"
            "try:\n"
            f"    s.sendall({payload!r})\n"
            "    print('answer:', s.recv(4096))\n"
            "except (BrokenPipeError, ConnectionResetError):\n"
            "    print('answer:', b'')\n")
    out = run_as(SECOND_UID, code, {"PATH": os.environ["PATH"]})
    assert "answer: b''" in out.stdout, out.stdout + out.stderr  # connected, then closed without a word
    assert not Path("theirs.safetensors").exists()
    server.ending = True
    exchange(open_path, encoded(request("encode_prompt", prompt_job())))  # (wakes it to end)
    thread.join(timeout=60)
    shutil.rmtree(shared)


def test_jobs_whose_environments_differ_share_the_worker(prompt_job, running_worker, monkeypatch):
    """A shell's variables (PS1 from `source .venv/bin/activate`, which job shells drop) or any other
    difference in the environment does not send a job elsewhere: a request carries no environment."""
    path, pid = running_worker
    for value in ("(.venv) $ ", None):
        if value is None:
            monkeypatch.delenv("PS1", raising=False)
        else:
            monkeypatch.setenv("PS1", value)
        assert client.run_in_worker("encode_prompt", "row", prompt_job(), "", None, idle_s=30) == 0
        assert worker_pid(path) == pid
    assert "PS1" not in path.with_suffix(".log").read_text()


def test_the_worker_keeps_the_compilers_caches_in_a_private_folder(private_home, running_worker):
    """Inductor and Triton would cache compiled code in /tmp/torchinductor_<user>, a folder another user
    could make first; the worker (and a job in its own process) points both at private folders."""
    path, pid = running_worker
    environ = dict(item.split("=", 1) for item in
                   Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in item)
    base = private_home / "cache" / "turbowan"
    assert environ["TORCHINDUCTOR_CACHE_DIR"] == str(base / "inductor")
    assert environ["TRITON_CACHE_DIR"] == str(base / "triton")
    for name in ("inductor", "triton"):
        assert ((base / name).stat().st_mode & 0o777) == 0o700
