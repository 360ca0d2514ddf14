"""The fork server: model jobs run in workers forked from one process that imported the libraries
once, or in their own process whenever that could differ from running on their own."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from turbowan import forkserver

from .conftest import REPO, alive


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server started as the Snakefile starts it, and the environment a job of its run has."""
    env = dict(os.environ)  # (pytest changes PYTEST_CURRENT_TEST as it goes: the jobs keep this one)
    log = tmp_path_factory.mktemp("server") / "fork_server.log"
    path = forkserver.start(log)
    env[forkserver.SOCKET_ENV] = path
    yield dict(path=path, env=env, log=log, pid=int(Path(path).with_name("pid").read_text()))
    forkserver.stop()


def job(env: dict, folder: Path, stage: str, wait: bool = True, extra_env: dict | None = None, **kwargs):
    """A model job's process as Snakemake starts it: run_job with a stage given by name."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from turbowan.jobs import run_job; "
            f"run_job('sample_high', {str(folder / 'job.log')!r}, {stage!r}, out={str(folder / 'facts.json')!r}, "
            f"**{kwargs!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=folder, env={**env, **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def facts(folder: Path) -> dict:
    return json.loads((folder / "facts.json").read_text())


def test_a_job_runs_in_a_worker_that_has_the_libraries_and_the_jobs_streams_cwd_and_environment(server, tmp_path):
    rc, out, err = job(server["env"], tmp_path, "tests.fork_stages:report", extra_env={"OMP_NUM_THREADS": "3"},
                       message="hello from the stage")
    assert rc == 0, err
    seen = facts(tmp_path)
    assert seen["ppid"] == server["pid"]  # forked by the server...
    assert seen["imported_diffusers_first"]  # ...which had imported diffusers before the job asked
    assert seen["cwd"] == str(tmp_path)
    assert seen["threads"] == "3" and seen["torch_threads"] == 3  # Snakemake's per-job variable, as torch takes it
    assert seen["pgid"] == os.getpgid(0)  # the job's process group (the job runs in this test's)
    assert seen["argv"] == ["-c"]
    assert "hello from the stage" in out  # the worker's stdout is the job's
    log = (tmp_path / "job.log").read_text()
    assert f"pid {seen['pid']}, a worker of the fork server (pid {server['pid']})" in log
    assert "sample_high done in" in log
    assert f"runs in worker {seen['pid']}" in server["log"].read_text()


@pytest.mark.gpu
def test_a_worker_can_start_cuda(server, tmp_path):
    """diffusers' import asks torch.cuda.is_available(), which by the CUDA driver would forbid CUDA
    in every forked child; the server has torch ask NVML instead."""
    rc, out, err = job(server["env"], tmp_path, "tests.fork_stages:use_cuda")
    assert rc == 0, err
    assert facts(tmp_path)["ppid"] == server["pid"]
    assert "cuda sum 8" in out
    assert "could not start CUDA" not in server["log"].read_text()


def test_a_job_ends_only_once_its_worker_has_ended(server, tmp_path):
    """As a job's own process: the next job must find the card's memory and lock free."""
    rc, _, err = job(server["env"], tmp_path, "tests.fork_stages:hold_memory")
    assert rc == 0, err
    worker = facts(tmp_path)["pid"]
    assert facts(tmp_path)["ppid"] == server["pid"]
    assert not alive(worker) and not Path(f"/proc/{worker}").exists()  # gone and reaped, no waiting


def test_a_job_whose_server_is_stopped_midway_gets_its_workers_status(tmp_path, monkeypatch):
    monkeypatch.delenv(forkserver.SOCKET_ENV, raising=False)  # (the module's server's, back afterwards)
    env = dict(os.environ)
    path = forkserver.start(tmp_path / "server.log")
    env[forkserver.SOCKET_ENV] = path
    server_pid = int(Path(path).with_name("pid").read_text())
    try:
        proc = job(env, tmp_path, "tests.fork_stages:nap", wait=False, seconds=2)
        assert wait_for(lambda: (tmp_path / "facts.json").exists())
        assert facts(tmp_path)["ppid"] == server_pid
        os.kill(server_pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "sample_high done in" in (tmp_path / "job.log").read_text()
    finally:
        forkserver.stop()


def test_a_failing_stage_fails_the_job_with_its_traceback(server, tmp_path):
    rc, _, err = job(server["env"], tmp_path, "tests.fork_stages:fail")
    assert rc == 1
    assert "RuntimeError: this stage fails on purpose" in err
    assert facts(tmp_path)["ppid"] == server["pid"]
    assert "sample_high failed after" in (tmp_path / "job.log").read_text()


def test_killing_the_job_stops_its_worker(server, tmp_path):
    proc = job(server["env"], tmp_path, "tests.fork_stages:sleep", wait=False)
    assert wait_for(lambda: (tmp_path / "facts.json").exists())
    worker = facts(tmp_path)["pid"]
    assert facts(tmp_path)["ppid"] == server["pid"] and alive(worker)
    proc.kill()  # as Snakemake cancelling the job, or anything else killing it
    proc.wait()
    assert wait_for(lambda: not alive(worker), timeout=5)
    assert alive(server["pid"])  # the server goes on


def test_a_killed_worker_fails_the_job_as_a_killed_process_would(server, tmp_path):
    rc, _, _ = job(server["env"], tmp_path, "tests.fork_stages:die")
    assert facts(tmp_path)["ppid"] == server["pid"]
    assert rc == 128 + signal.SIGKILL


def test_a_job_whose_environment_differs_imports_its_own(server, tmp_path):
    rc, _, err = job(server["env"], tmp_path, "tests.fork_stages:report", extra_env={"TURBOWAN_TEST_EXTRA": "1"})
    assert rc == 0, err
    seen = facts(tmp_path)
    assert seen["ppid"] != server["pid"] and not seen["imported_diffusers_first"]
    assert seen["extra"] == "1"
    assert ("own imports: fork server refused: the job's environment differs from the fork server's in "
            "TURBOWAN_TEST_EXTRA") in (tmp_path / "job.log").read_text()


def test_arguments_that_json_would_change_are_not_sent(server, tmp_path):
    rc, out, err = job(server["env"], tmp_path, "tests.fork_stages:report", message=("a", "tuple"))
    assert rc == 0, err
    assert "('a', 'tuple')" in out
    assert facts(tmp_path)["ppid"] != server["pid"]
    assert "do not come back the same from JSON" in (tmp_path / "job.log").read_text()


def test_without_a_server_a_job_imports_its_own(tmp_path):
    env = {**os.environ, forkserver.SOCKET_ENV: str(tmp_path / "no-such-socket")}
    rc, _, err = job(env, tmp_path, "tests.fork_stages:report")
    assert rc == 0, err
    assert not facts(tmp_path)["imported_diffusers_first"]
    assert "own imports: fork server" in (tmp_path / "job.log").read_text()
    assert "not usable" in (tmp_path / "job.log").read_text()


def test_the_server_refuses_other_code_another_python_or_another_environment():
    env = {"HOME": "/home/me", "OMP_NUM_THREADS": "1"}
    request = dict(code="A", executable=sys.executable, env={**env, "OMP_NUM_THREADS": "4", "TMPDIR": "/scratch"})
    threads = forkserver.os_threads()

    def refusal(changes: dict, server_threads: int = threads) -> str:
        return forkserver._refusal({**request, **changes}, "A", env, server_threads)

    assert refusal({}) == ""  # Snakemake's per-job variables
    assert "code changed" in refusal({"code": "B"})
    assert "/other/python" in refusal({"executable": "/other/python"})
    assert "HF_HOME ('/x' against unset)" in refusal({"env": {**env, "HF_HOME": "/x"}})
    assert "HOME (unset against '/home/me')" in refusal({"env": {"OMP_NUM_THREADS": "1"}})
    assert "fork is not safe" in refusal({}, server_threads=threads - 1)  # a thread started since
    assert refusal({}, server_threads=threads + 1) == ""  # one has ended


def test_editing_the_code_changes_its_fingerprint(tmp_path):
    package = tmp_path / "turbowan"
    shutil.copytree(REPO / "turbowan", package, ignore=shutil.ignore_patterns("__pycache__"))
    before = forkserver.code_fingerprint(package)
    assert forkserver.code_fingerprint(package) == before
    stages = package / "stages.py"
    stages.write_text(stages.read_text() + "\n# edited\n")
    assert forkserver.code_fingerprint(package) != before
    (package / "new.py").write_text("")
    stages.unlink()
    assert forkserver.code_fingerprint(package) != before


def test_the_server_ends_with_the_process_that_started_it(tmp_path):
    """As when Snakemake is killed and runs no handler."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from turbowan import forkserver; "
            f"print(forkserver.start({str(tmp_path / 'server.log')!r}))")
    path = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    pid = int(Path(path).with_name("pid").read_text())
    try:
        assert wait_for(lambda: not alive(pid), timeout=60)
        assert "Snakemake has ended; so does the fork server" in (tmp_path / "server.log").read_text()
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(Path(path).parent, ignore_errors=True)


def test_stop_ends_the_server_and_removes_its_socket(tmp_path, monkeypatch):
    monkeypatch.delenv(forkserver.SOCKET_ENV, raising=False)
    path = forkserver.start(tmp_path / "server.log")
    pid = int(Path(path).with_name("pid").read_text())
    assert os.environ[forkserver.SOCKET_ENV] == path
    forkserver.stop()
    assert forkserver.SOCKET_ENV not in os.environ
    assert not Path(path).parent.exists()
    assert wait_for(lambda: not alive(pid), timeout=10)


def test_a_job_that_stopped_waiting_gets_no_worker(caplog):
    """A job that gave up waiting (ANSWER_TIMEOUT_S) runs the stage itself: a late worker would
    write the same log and outputs."""
    env = {"HOME": "/home/me"}
    job_side, server_side = socket.socketpair()
    request = dict(name="sample_high", code="A", executable=sys.executable, env=env, kwargs={})
    payload = json.dumps(request).encode()
    socket.send_fds(job_side, [b"J"], [0, 1, 2])
    job_side.sendall(len(payload).to_bytes(8, "big") + payload)
    job_side.close()
    server_side.settimeout(forkserver.REQUEST_TIMEOUT_S)  # (as the server's connections have it)
    server = forkserver._Server(listener=socket.socket(socket.AF_UNIX), wakeup=(-1, -1), code="A", env=env,
                                threads=forkserver.os_threads(), broken="")
    with caplog.at_level("INFO", logger="turbowan.forkserver"):
        forkserver._serve_one(server, server_side)
    assert server.workers == {}
    assert "refused sample_high: the job had stopped waiting" in caplog.text
    server.listener.close()
    waiting, server_side = socket.socketpair()
    server_side.settimeout(forkserver.REQUEST_TIMEOUT_S)
    started = time.monotonic()
    assert not forkserver._job_is_gone(server_side)  # one still waiting, told at once
    assert time.monotonic() - started < 1
    waiting.close()
    assert forkserver._job_is_gone(server_side)
