"""A machine shared between users: what one user's jobs write or lock, another user must not be able
to take over, and a job's own threads must not open its files to others.

The tests that act as a second user run as root (CI does) and switch to `nobody` with setpriv; they are
skipped elsewhere, and fail instead when TURBOWAN_REQUIRE_SLURM=1 (as in CI) says they must run.
"""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from turbowan.runtime.gpus import Card, NoFreeGpu, UnsafeLockFile, assign_gpu, lock_card
from turbowan.private import UnsafeFolder

REPO = Path(__file__).resolve().parents[1]
OTHER = 65534  # nobody
CARD = "GPU-5ea7ed00-0000-0000-0000-000000000000"


# --------------------------------------------------------------------------- the umask, with threads

UMASK_CODE = """
import os, sys, threading
os.umask(0o022)  # (before turbowan reads it)
sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: a race shows at once
from turbowan.files.artifacts import atomic_dir, atomic_path, default_mode

out, rounds = sys.argv[1], int(sys.argv[2])
stop = threading.Event()

def churn():
    while not stop.is_set():
        default_mode()
        default_mode(directory=True)

def write(t):
    for i in range(rounds):
        with atomic_path(f"{out}/t{t}/f{i}.bin") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(f"{out}/t{t}/d{i}") as tmp:
            (tmp / "frame.png").write_bytes(b"x")  # created by open(), under the process's umask
            (tmp / "sub").mkdir()
        with open(f"{out}/t{t}/plain{i}", "w") as f:
            f.write("x")

churners = [threading.Thread(target=churn) for _ in range(2)]
writers = [threading.Thread(target=write, args=(t,)) for t in range(4)]
for t in churners + writers:
    t.start()
for t in writers:
    t.join()
stop.set()
for t in churners:
    t.join()
print(oct(os.umask(0o022)))
"""


def test_files_written_from_threads_keep_the_umask(tmp_path):
    """default_mode never changes the process's umask: under umask 022, threads writing results while
    another asks default_mode over and over make no file or folder that others may write."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", UMASK_CODE, str(out), "150"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0o22"  # the umask after all that: unchanged
    open_to_others = []
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.lstat(path).st_mode & 0o022:
                open_to_others.append(f"{path} {stat.filemode(os.lstat(path).st_mode)}")
    assert sum(len(files) for _, _, files in os.walk(out)) == 4 * 150 * 3
    assert open_to_others == []


# --------------------------------------------------------------------------- card locks between users


@pytest.fixture
def as_root():
    """Root, able to act as another user (setpriv), or a skip (a failure where CI requires these tests)."""
    if os.geteuid() == 0 and shutil.which("setpriv"):
        return
    why = "acting as a second user needs root and setpriv (CI runs as root)"
    if os.environ.get("TURBOWAN_REQUIRE_SLURM") == "1":
        pytest.fail(f"TURBOWAN_REQUIRE_SLURM=1 but {why}")
    pytest.skip(why)


@pytest.fixture
def public_tmp():
    """A folder in /tmp that another user can reach (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="turbowan-shared-test-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def code_for_others(public_tmp):
    """The modules a card-locking job needs, where another user can read them (the checkout or the venv
    may sit in root's home); run with the system's Python (stdlib only)."""
    package = public_tmp / "code" / "turbowan"
    (package / "runtime").mkdir(parents=True)
    for name in ("__init__.py", "runtime/__init__.py", "runtime/gpus.py", "private.py"):
        shutil.copyfile(REPO / "turbowan" / name, package / name)
    for root, dirs, files in os.walk(public_tmp / "code"):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return public_tmp / "code"


def other_python() -> str:
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def run_as_other(code: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups", other_python(),
                             "-c", code, *args], env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


# Another user's GPU job: lock the card, say so, hold it until a line comes on stdin.
OTHER_JOB = """
import os, sys
os.umask(0o077)  # a careful user's umask: their lock file must still be lockable by others
sys.path.insert(0, sys.argv[1])
from turbowan.runtime.gpus import assign_gpu
card = assign_gpu("other", env={"TURBOWAN_GPUS": sys.argv[2], "TURBOWAN_GPU_LOCK_DIR": sys.argv[3],
                                "TURBOWAN_GPU_WAIT_S": "20"})
print("locked", card.lock_path, flush=True)
sys.stdin.readline()
card.release()
"""


def admin_folder(public_tmp: Path, mode: int) -> Path:
    """A lock folder as an administrator makes it: root's, sticky, writable by all (1777) or by a group."""
    folder = public_tmp / "gpu-locks"
    folder.mkdir()
    os.chown(folder, 0, OTHER)  # (the group of nobody: the "gpu" group of a 3770 folder)
    folder.chmod(mode)
    return folder


def test_a_lock_folder_made_by_another_user_is_refused(as_root, public_tmp):
    """A lock folder that another user made (first) is theirs: refused, naming it, its owner and mode."""
    for mode in (0o1777, 0o700):
        folder = public_tmp / f"locks-{mode:o}"
        folder.mkdir()
        os.chown(folder, OTHER, OTHER)
        folder.chmod(mode)
        with pytest.raises(UnsafeFolder) as err:
            assign_gpu("x", env={"TURBOWAN_GPUS": CARD, "TURBOWAN_GPU_LOCK_DIR": str(folder)})
        message = str(err.value)
        assert f"GPU lock folder {folder}: owned by " in message and f"(uid {OTHER})" in message
        assert f"mode {mode:04o}" in message and "made by an administrator" in message
        assert list(folder.iterdir()) == []


def test_a_link_planted_by_another_user_in_a_shared_folder_is_not_followed(as_root, public_tmp, tmp_path):
    folder = admin_folder(public_tmp, 0o1777)
    precious = tmp_path / "precious.safetensors"  # root's file, which nobody cannot even read
    precious.write_bytes(b"root's data")
    plant = run_as_other("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(precious),
                         str(folder / f"{CARD}.lock"))
    assert plant.wait(timeout=60) == 0, plant.stderr.read()
    with pytest.raises(UnsafeLockFile) as err:
        assign_gpu("x", env={"TURBOWAN_GPUS": CARD, "TURBOWAN_GPU_LOCK_DIR": str(folder), "TURBOWAN_GPU_WAIT_S": "0"})
    assert f"{folder / CARD}.lock: is a symbolic link made by " in str(err.value) and f"uid {OTHER}" in str(err.value)
    assert precious.read_bytes() == b"root's data"


@pytest.mark.parametrize("mode, file_mode", [(0o1777, 0o644), (0o3770, 0o640)])
def test_users_share_cards_through_an_administrators_folder(as_root, public_tmp, code_for_others, mode, file_mode):
    """Whoever comes first creates a card's lock file; the other user's job locks the same file (read-only:
    it cannot write it), and while one holds the card the other waits for it."""
    folder = admin_folder(public_tmp, mode)
    lock = folder / f"{CARD}.lock"

    mine = assign_gpu("mine", env={"TURBOWAN_GPUS": CARD, "TURBOWAN_GPU_LOCK_DIR": str(folder)})
    assert mine.how == "locked" and mine.lock_path == str(lock)
    info = os.lstat(lock)
    assert info.st_uid == 0 and stat.S_IMODE(info.st_mode) == file_mode
    my_line = lock.read_text()
    assert my_line.startswith(f"pid {os.getpid()} of root")
    mine.release()

    other = run_as_other(OTHER_JOB, str(code_for_others), CARD, str(folder), stdin=subprocess.PIPE)
    try:
        line = other.stdout.readline()
        assert line.strip() == f"locked {lock}", other.stderr.read() if other.poll() is not None else line
        assert lock.read_text() == my_line  # not its file: nothing written into it
        start = time.monotonic()
        with pytest.raises(NoFreeGpu, match="all 1 cards are locked"):
            lock_card([Card(0, CARD)], str(folder), wait_s=1.0, poll_s=0.1)
        assert time.monotonic() - start >= 1.0
    finally:
        other.stdin.write("\n")
        other.stdin.close()
        assert other.wait(timeout=60) == 0, other.stderr.read()
    again = assign_gpu("again", env={"TURBOWAN_GPUS": CARD, "TURBOWAN_GPU_LOCK_DIR": str(folder)})
    again.release()


def test_a_lock_file_another_user_made_first_is_locked_but_never_written(as_root, public_tmp, code_for_others):
    folder = admin_folder(public_tmp, 0o1777)
    lock = folder / f"{CARD}.lock"
    other = run_as_other(OTHER_JOB, str(code_for_others), CARD, str(folder), stdin=subprocess.PIPE)
    try:
        assert other.stdout.readline().strip() == f"locked {lock}", other.stderr.read()
    finally:
        other.stdin.write("\n")
        other.stdin.close()
        assert other.wait(timeout=60) == 0, other.stderr.read()
    info = os.lstat(lock)
    assert info.st_uid == OTHER and stat.S_IMODE(info.st_mode) == 0o644  # its umask did not hide it from others
    their_line = lock.read_text()
    assert their_line.startswith(f"pid {other.pid} of nobody")  # (setpriv execs the job: same pid)
    mine = assign_gpu("mine", env={"TURBOWAN_GPUS": CARD, "TURBOWAN_GPU_LOCK_DIR": str(folder)})
    try:
        assert mine.how == "locked"
        assert lock.read_text() == their_line  # root locks it, and writes nothing into another user's file
    finally:
        mine.release()
