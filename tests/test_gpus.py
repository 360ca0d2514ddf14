"""One card per job on a multi-GPU box (turbowan.runtime.gpus), with fake card lists on the CPU.

The jobs are real processes: flock locks belong to processes, and "a killed job frees its card"
can only be shown by killing one.
"""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from turbowan.runtime.gpus import (
    Card, NoFreeGpu, UnsafeLockFile, allowed_cards, assign_gpu, lock_card, parse_nvidia_smi,
)
from turbowan.private import UnsafeFolder

REPO = Path(__file__).resolve().parents[1]
CARDS = ["GPU-00000000-aaaa", "GPU-11111111-bbbb", "GPU-22222222-cccc"]

# A GPU job in miniature: take a card the way run_stage does, say which, hold it until told.
HOLDER = """
import logging, os, sys, time
from turbowan.runtime.gpus import assign_gpu
logging.basicConfig(level=logging.INFO)
card = assign_gpu("holder")
print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.05)
"""


def start_holder(tmp_path: Path, cards, lock_dir: Path, go: Path, wait_s: float = 30, **extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TURBOWAN_GPUS": ",".join(cards),
           "TURBOWAN_GPU_LOCK_DIR": str(lock_dir), "TURBOWAN_GPU_WAIT_S": str(wait_s), **extra}
    env.pop("SLURM_JOB_ID", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(go)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_nvidia_smi_listing_is_parsed():
    out = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-3f2a9c1e-1111-2222-3333-444455556666)\n"
           "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-0badcafe-1111-2222-3333-444455556666)\n"
           "  MIG 1g.5gb     Device  0: (UUID: MIG-aaaaaaaa-1111-2222-3333-444455556666)\n")
    assert parse_nvidia_smi(out) == [
        Card(0, "GPU-3f2a9c1e-1111-2222-3333-444455556666", "NVIDIA H100 80GB HBM3"),
        Card(1, "GPU-0badcafe-1111-2222-3333-444455556666", "NVIDIA A100-SXM4-40GB"),
    ]


def test_cuda_visible_devices_restricts_the_cards():
    cards = [Card(i, uuid) for i, uuid in enumerate(CARDS)]
    assert allowed_cards(cards, None) == cards
    assert allowed_cards(cards, "2,0") == [cards[2], cards[0]]
    assert allowed_cards(cards, "GPU-1111") == [cards[1]]  # a UUID prefix, as CUDA allows
    assert allowed_cards(cards, "") == []
    with pytest.raises(ValueError, match="'7' names no single card"):
        allowed_cards(cards, "0,7")


def test_concurrent_jobs_get_distinct_cards(tmp_path):
    go = tmp_path / "go"
    jobs = [start_holder(tmp_path, CARDS, tmp_path / "locks", go) for _ in CARDS]
    try:
        got = [job.stdout.readline().strip() for job in jobs]
    finally:
        go.touch()
    for job in jobs:
        assert job.wait(timeout=30) == 0, job.stderr.read()
    assert sorted(got) == sorted(CARDS)


def test_a_killed_holder_frees_its_card_for_a_waiting_job(tmp_path):
    go = tmp_path / "go"
    first = start_holder(tmp_path, CARDS[:1], tmp_path / "locks", go)
    assert first.stdout.readline().strip() == CARDS[0]
    second = start_holder(tmp_path, CARDS[:1], tmp_path / "locks", go)
    time.sleep(3)
    assert second.poll() is None  # still waiting for the only card
    first.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel drops the lock
    first.wait()
    start = time.monotonic()
    assert second.stdout.readline().strip() == CARDS[0]
    assert time.monotonic() - start < 10
    go.touch()
    assert second.wait(timeout=30) == 0
    err = second.stderr.read()
    assert "all 1 cards are busy" in err and f"pid {first.pid}" in err  # the wait was logged


def test_no_free_card_waits_then_fails_clearly(tmp_path):
    go = tmp_path / "go"
    holder = start_holder(tmp_path, CARDS[:2], tmp_path / "locks", go)
    other = start_holder(tmp_path, CARDS[:2], tmp_path / "locks", go)
    try:
        assert {holder.stdout.readline().strip(), other.stdout.readline().strip()} == set(CARDS[:2])
        start = time.monotonic()
        with pytest.raises(NoFreeGpu) as err:
            lock_card([Card(0, CARDS[0]), Card(1, CARDS[1])], str(tmp_path / "locks"), wait_s=1.5,
                      poll_s=0.1)
        assert time.monotonic() - start >= 1.5
        message = str(err.value)
        assert "no free GPU after waiting" in message and "all 2 cards are locked" in message
        assert f"pid {holder.pid}" in message and f"pid {other.pid}" in message
        assert "--resources gpu=N" in message
    finally:
        go.touch()
        holder.wait(timeout=30)
        other.wait(timeout=30)


def test_slurm_assignment_is_used_as_is(tmp_path):
    env = {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "1",
           "TURBOWAN_GPUS": ",".join(CARDS), "TURBOWAN_GPU_LOCK_DIR": str(tmp_path / "locks")}
    card = assign_gpu("sample_high", env=env)
    assert card.how == "slurm" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert not (tmp_path / "locks").exists()  # no lock taken
    assert "assigned by SLURM job 42" in card.describe()


def test_a_job_sees_one_card_by_uuid_so_its_device_is_cuda_0(tmp_path):
    """Whatever card it gets, the job's only device is `cuda` (index 0): same code, same noise."""
    env = {"TURBOWAN_GPUS": ",".join(CARDS), "CUDA_VISIBLE_DEVICES": "2",
           "TURBOWAN_GPU_LOCK_DIR": str(tmp_path / "locks")}
    card = assign_gpu("sample_low", env=env)
    try:
        assert card.how == "locked" and card.card == Card(2, CARDS[2], "from TURBOWAN_GPUS")
        assert env["CUDA_VISIBLE_DEVICES"] == CARDS[2]
    finally:
        card.release()
    assert assign_gpu("x", device="cpu", env=dict(env)).how == "cpu"
    assert assign_gpu("x", device="cuda:1", env=dict(env)).how == "pinned"
    assert assign_gpu("x", env={"TURBOWAN_GPUS": ""}).how == "none"


def test_a_model_job_logs_the_card_it_took_and_frees_it(tmp_path):
    """run_model_job takes a card before anything starts CUDA and says which in the job's log; the
    stage (here, in the job's own process: worker=False) sees only that card."""
    code = (
        "import sys\n"
        "from turbowan.runtime.jobs import run_model_job\n"
        f"run_model_job('sample_high', 'row', {str(tmp_path / 'job.log')!r}, {{'device': 'auto'}}, gpus=1,"
        " worker=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TURBOWAN_GPUS": ",".join(CARDS[1:]),
           "TURBOWAN_GPU_LOCK_DIR": str(tmp_path / "locks"), "TURBOWAN_INJECT_FAULT": "sample_high:row"}
    env.pop("SLURM_JOB_ID", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # the injected fault fails the row, after the card was taken
    log = (tmp_path / "job.log").read_text()
    assert f"gpu: card 0 from TURBOWAN_GPUS uuid={CARDS[1]}, locked via {tmp_path / 'locks'}" in log
    assert "fault injected by TURBOWAN_INJECT_FAULT for sample_high:row" in log
    # the job has ended, so its card is free again at once
    again = assign_gpu("again", env={"TURBOWAN_GPUS": CARDS[1], "TURBOWAN_GPU_WAIT_S": "0",
                                     "TURBOWAN_GPU_LOCK_DIR": str(tmp_path / "locks")})
    assert again.how == "locked"
    again.release()


def test_the_model_libraries_import_with_the_unused_packages_hidden():
    """What a model stage imports still imports once hide_unused_packages has run."""
    code = (
        "from turbowan.runtime.rows import hide_unused_packages, UNUSED_PACKAGES\n"
        "assert hide_unused_packages() == list(UNUSED_PACKAGES)\n"
        "from diffusers import AutoencoderKLWan, WanTransformer3DModel\n"
        "from transformers import AutoTokenizer, UMT5EncoderModel\n"
        "import importlib.util\n"
        "print([importlib.util.find_spec(name) for name in UNUSED_PACKAGES])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[None, None, None, None]"


# --------------------------------------------------------------------------- the lock folder and files


def test_the_default_lock_folder_is_private(tmp_path):
    """Without TURBOWAN_GPU_LOCK_DIR the locks live in the user's private folder (0700, ours), not in a
    fixed /tmp name that another user could have made first."""
    cache = tmp_path / "cache"
    card = assign_gpu("x", env={"TURBOWAN_GPUS": CARDS[0], "XDG_CACHE_HOME": str(cache)})
    try:
        lock = Path(card.lock_path)
        assert lock == cache / "turbowan" / "locks" / f"{CARDS[0]}.lock"
        folder = os.lstat(lock.parent)
        assert folder.st_uid == os.getuid() and stat.S_IMODE(folder.st_mode) == 0o700
        info = os.lstat(lock)
        assert stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o600
        assert f"pid {os.getpid()} of " in lock.read_text()  # the holder line, in our own file
    finally:
        card.release()


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_a_planted_lock_file_is_not_followed(tmp_path, kind):
    """A link at a card's lock path (another user's, were the folder shared) is never followed: the file
    it points to keeps its bytes and the job stops, naming the link; a FIFO does not hang it."""
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    precious = tmp_path / "precious.safetensors"
    precious.write_bytes(b"twelve bytes")
    planted = locks / f"{CARDS[0]}.lock"
    if kind == "link":
        planted.symlink_to(precious)
    else:
        os.mkfifo(planted)
    env = {"TURBOWAN_GPUS": CARDS[0], "TURBOWAN_GPU_LOCK_DIR": str(locks), "TURBOWAN_GPU_WAIT_S": "0"}
    with pytest.raises(UnsafeLockFile) as err:
        assign_gpu("x", env=env)
    message = str(err.value)
    assert str(planted) in message
    assert ("is a symbolic link made by" in message) if kind == "link" else ("not a regular file" in message)
    assert precious.read_bytes() == b"twelve bytes"
    assert "CUDA_VISIBLE_DEVICES" not in env


@pytest.mark.parametrize("mode", [0o777, 0o755, 0o1755])
def test_a_lock_folder_open_to_others_is_refused(tmp_path, mode):
    """A lock folder others may write or read (and not an administrator's sticky one) is refused, with a
    message naming the folder, its owner and its mode."""
    locks = tmp_path / "locks"
    locks.mkdir()
    locks.chmod(mode)
    with pytest.raises(UnsafeFolder) as err:
        assign_gpu("x", env={"TURBOWAN_GPUS": CARDS[0], "TURBOWAN_GPU_LOCK_DIR": str(locks)})
    message = str(err.value)
    assert f"GPU lock folder {locks}: owned by " in message and f"uid {os.getuid()}" in message
    assert f"mode {mode:04o}" in message and "refusing it" in message
    assert list(locks.iterdir()) == []


def test_a_named_lock_folder_that_does_not_exist_is_made_private(tmp_path):
    locks = tmp_path / "new" / "locks"
    card = assign_gpu("x", env={"TURBOWAN_GPUS": CARDS[0], "TURBOWAN_GPU_LOCK_DIR": str(locks)})
    card.release()
    assert stat.S_IMODE(os.lstat(locks).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(locks / f"{CARDS[0]}.lock").st_mode) == 0o600
    link = tmp_path / "link"
    link.symlink_to(locks)
    with pytest.raises(UnsafeFolder, match=f"GPU lock folder {link}: is a link or not a folder"):
        assign_gpu("x", env={"TURBOWAN_GPUS": CARDS[0], "TURBOWAN_GPU_LOCK_DIR": str(link)})


def test_make_gpu_installs_turbodiffusion_against_the_venvs_torch():
    """`make gpu` (not run here: no GPU) checks for nvcc and a CUDA torch, then installs turbodiffusion."""
    proc = subprocess.run(["make", "-n", "gpu"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    pip = ".venv/bin/python -m pip install --no-build-isolation --no-deps turbodiffusion"
    assert pip in lines
    before = "\n".join(lines[:lines.index(pip)])
    assert "command -v nvcc" in before and "assert torch.version.cuda" in before
