"""One GPU per job on a box with several: a lock file per card, taken before CUDA starts.

Snakemake's `--resources gpu=N` only counts GPU jobs; it does not say which card a job should
use, so without this every job would land on card 0. Each GPU job therefore locks one free card
(`fcntl.flock` on `<lock folder>/<card uuid>.lock`) and sets `CUDA_VISIBLE_DEVICES` to that card's
UUID before torch initialises CUDA. The job then sees exactly one device, `cuda` (index 0), so
its code, and the noise its generator draws, are the same whichever card it got. The kernel
drops a flock when the process dies, however it dies, so a killed job never keeps its card.
The lock folder is per user and machine, not per batch: two batches on one box share the cards.

Where the locks live, on a machine with several users:

- By default in this user's private folder (turbowan.private: `private_dir("locks")`,
  mode 0700): no other user can plant links there, read the lock files or hold them. Another
  user's jobs then do not see these locks: on a box shared between users, give the cards out by
  CUDA_VISIBLE_DEVICES, or have an administrator make a shared folder:
- TURBOWAN_GPU_LOCK_DIR names the folder to use. A folder of our own (or a new one, created
  0700) must be ours alone. A folder shared between users is accepted only as an administrator
  makes it: a real folder (not a link) owned by root, sticky (users cannot remove or replace
  each other's files) and writable by those who share the cards: `chmod 1777` for everyone, or
  `chgrp gpu && chmod 3770` for a group. Anything else is refused, naming the folder, its owner
  and its mode. In a shared folder anyone who may use the cards can hold a card's lock: that is
  what sharing them means.

How a lock file is opened: through a descriptor of the checked folder (no path is resolved twice),
never following a link (O_NOFOLLOW), and never blocking on a planted FIFO. The first job to use a
card creates its file (O_CREAT|O_EXCL: mode 0600 in a private folder, 0644 in a folder shared
with everyone, 0640 in a group's); every later job, of any user, opens the existing file (without
O_CREAT or O_TRUNC; read-only when it is another user's: flock works on a read-only descriptor)
and checks that it is a regular file. A link, or a file this user cannot open, stops the job with
a message naming it: nothing is followed, truncated or written. The holder line ("pid ... of <user> on <host>, <job>, since ...", shown while others
wait) is written only into a lock file this user owns, with one name (a planted hard link is not
written through); in a shared folder the line of a file owned by another user may therefore name
that user's last job rather than the current holder. flock on NFS needs write access, so a shared
folder must be on a local disk (it is per machine anyway).

Under SLURM (SLURM_JOB_ID set) the card SLURM assigned is used as is: SLURM already keeps jobs
apart, and its numbering inside a job need not match the node's.

Card discovery never initialises CUDA: it reads `nvidia-smi -L`, else /proc/driver/nvidia/gpus.
TURBOWAN_GPUS (comma-separated UUIDs) replaces discovery, for tests and for odd machines.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import re
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Sequence

from ..private import UnsafeFolder, ensure_private, private_dir

log = logging.getLogger(__name__)

LOCK_DIR_NAME = "locks"  # the default lock folder: private_dir(LOCK_DIR_NAME)
DEFAULT_WAIT_S = 3600.0
ENV_CARDS = "TURBOWAN_GPUS"
ENV_LOCK_DIR = "TURBOWAN_GPU_LOCK_DIR"
ENV_WAIT = "TURBOWAN_GPU_WAIT_S"


class NoFreeGpu(RuntimeError):
    """Every card this job may use stayed locked by other jobs for the whole wait."""


class UnsafeLockFile(UnsafeFolder):
    """A card's lock file is a link, not a regular file, or cannot be opened by this user."""


@dataclass(frozen=True)
class Card:
    index: int  # nvidia-smi's number (PCI bus order)
    uuid: str
    name: str = ""


@dataclass
class Assignment:
    """What a job runs on; `describe()` is the line the job log gets."""

    how: str  # "locked", "slurm", "pinned", "cpu", "none"
    visible: str | None = None  # CUDA_VISIBLE_DEVICES as the job will run with it
    card: Card | None = None
    lock_path: str | None = None
    slurm_job: str | None = None
    _fd: int | None = None

    def describe(self) -> str:
        visible = "<unset>" if self.visible is None else self.visible
        if self.how == "locked" and self.card is not None:
            name = f" {self.card.name}" if self.card.name else ""
            return (f"gpu: card {self.card.index}{name} uuid={self.card.uuid}, locked via "
                    f"{self.lock_path}; CUDA_VISIBLE_DEVICES={visible}")
        if self.how == "slurm":
            return f"gpu: assigned by SLURM job {self.slurm_job}; CUDA_VISIBLE_DEVICES={visible}"
        if self.how == "pinned":
            return f"gpu: device pinned by the config, no card lock taken; CUDA_VISIBLE_DEVICES={visible}"
        if self.how == "cpu":
            return "gpu: none, the config runs this job on the CPU"
        return f"gpu: no NVIDIA card found, none locked; CUDA_VISIBLE_DEVICES={visible}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


_SMI_LINE = re.compile(r"^GPU (\d+): (.*?) \(UUID: (GPU-[0-9a-fA-F-]+)\)")


def parse_nvidia_smi(text: str) -> list[Card]:
    """Cards from `nvidia-smi -L` output (MIG lines are ignored: whole cards only)."""
    cards = []
    for line in text.splitlines():
        match = _SMI_LINE.match(line.strip())
        if match:
            cards.append(Card(int(match.group(1)), match.group(3), match.group(2)))
    return cards


def _proc_cards() -> list[Card]:
    """Cards from the driver's /proc files, numbered in PCI bus order like nvidia-smi."""
    cards = []
    for index, folder in enumerate(sorted(glob.glob("/proc/driver/nvidia/gpus/*"))):
        fields = {}
        with open(os.path.join(folder, "information"), encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        cards.append(Card(index, fields.get("GPU UUID", ""), fields.get("Model", "")))
    return [card for card in cards if card.uuid]


def discover_cards(env: Mapping[str, str] = os.environ) -> list[Card]:
    """The NVIDIA cards of this machine, without initialising CUDA."""
    if ENV_CARDS in env:
        uuids = [u.strip() for u in env[ENV_CARDS].split(",") if u.strip()]
        return [Card(i, uuid, "from " + ENV_CARDS) for i, uuid in enumerate(uuids)]
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
            return parse_nvidia_smi(out)
        except (subprocess.SubprocessError, OSError) as err:
            log.warning("nvidia-smi -L failed (%s); trying /proc/driver/nvidia", err)
    return _proc_cards()


def allowed_cards(cards: Sequence[Card], visible: str | None) -> list[Card]:
    """The cards CUDA_VISIBLE_DEVICES (if the user set it) lets this run use.

    Entries are nvidia-smi numbers or UUIDs (a unique UUID prefix is enough, as for CUDA);
    an entry that names no card is an error rather than a silent fallback to other cards.
    """
    if visible is None:
        return list(cards)
    chosen = []
    for entry in (e.strip() for e in visible.split(",")):
        if not entry:
            continue
        if entry.isdigit():
            match = [c for c in cards if c.index == int(entry)]
        elif entry.startswith("GPU-"):
            match = [c for c in cards if c.uuid.startswith(entry)]
        else:  # "-1", "NoDevFiles", MIG ids: the user hid the cards or manages them
            match = []
        if len(match) != 1:
            raise ValueError(f"CUDA_VISIBLE_DEVICES={visible!r}: {entry!r} names no single card "
                             f"of {[c.uuid for c in cards]}")
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


@dataclass(frozen=True)
class LockFolder:
    """A checked lock folder: `shared` when an administrator's folder for several users."""

    path: str
    shared: bool
    file_mode: int  # of the lock files this user creates there


def check_lock_folder(path: str | os.PathLike) -> LockFolder:
    """The lock folder `path` if it is safe to use (see the module docstring), else UnsafeFolder.

    A folder that does not exist is created private (0700), as ensure_private does."""
    path = os.fspath(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        ensure_private(path)
        info = os.lstat(path)
    return _judge_folder(path, info)


def _judge_folder(path: str, info: os.stat_result) -> LockFolder:
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeFolder(f"GPU lock folder {path}: is a link or not a folder (owner {_user(info.st_uid)}); "
                           "refusing it: name a real folder in " + ENV_LOCK_DIR)
    if info.st_uid == os.getuid() and not mode & 0o077:
        return LockFolder(path, shared=False, file_mode=0o600)
    if info.st_uid == 0 and mode & stat.S_ISVTX and mode & 0o022:
        return LockFolder(path, shared=True, file_mode=0o644 if mode & 0o002 else 0o640)
    raise UnsafeFolder(
        f"GPU lock folder {path}: owned by {_user(info.st_uid)} with mode {mode:04o}; refusing it. "
        "A lock folder must be either yours alone (mode 0700; unset " + ENV_LOCK_DIR + " to use "
        "your private one) or, to share the cards between users, made by an administrator: owned by "
        "root, sticky and writable by those users (chmod 1777, or chgrp <group> and chmod 3770). "
        "In any other folder another user could plant links that make GPU jobs overwrite files, or "
        "replace lock files and put two jobs on one card."
    )


def lock_folder(env: Mapping[str, str] = os.environ) -> LockFolder:
    """TURBOWAN_GPU_LOCK_DIR if set (checked), else this user's private lock folder."""
    named = env.get(ENV_LOCK_DIR)
    if named:
        return check_lock_folder(named)
    return LockFolder(str(private_dir(LOCK_DIR_NAME, env)), shared=False, file_mode=0o600)


# Every lock file open: no link followed, no FIFO waited on, nothing inherited by children.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _open_lock_file(dir_fd: int, folder: LockFolder, name: str) -> tuple[int, os.stat_result]:
    """(fd, fstat) of a card's lock file, created by us if it does not exist; UnsafeLockFile if it is a
    link, not a regular file, or not ours to open."""
    path = os.path.join(folder.path, name)
    for _ in range(3):  # (a file removed between our two opens: once more)
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, folder.file_mode, dir_fd=dir_fd)
            os.fchmod(fd, folder.file_mode)  # the umask may have taken the bits others need to lock it
            return fd, os.fstat(fd)
        except (FileExistsError, PermissionError):
            pass  # someone made it first (any user): open it as it is, below
        try:
            try:  # (read-write where the mode allows, as flock over NFS needs; never truncated, never written
                # unless ours: see _write_holder)
                fd = os.open(name, os.O_RDWR | _OPEN_FLAGS, dir_fd=dir_fd)
            except PermissionError:  # another user's file: read-only is enough for flock
                fd = os.open(name, os.O_RDONLY | _OPEN_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise UnsafeLockFile(_unusable(dir_fd, path, name, err)) from err
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise UnsafeLockFile(f"GPU lock file {path}: not a regular file (owner {_user(info.st_uid)}, "
                                 f"mode {stat.filemode(info.st_mode)}); refusing to use it: remove it")
        return fd, info
    raise UnsafeLockFile(f"GPU lock file {path}: cannot be created in {folder.path} (is it writable for you?)")


def _unusable(dir_fd: int, path: str, name: str, err: OSError) -> str:
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return f"GPU lock file {path}: cannot be opened ({err})"
    if stat.S_ISLNK(info.st_mode):
        return (f"GPU lock file {path}: is a symbolic link made by {_user(info.st_uid)}; refusing to follow "
                "it (a job that did would overwrite the file it points to). Remove it, and tell the "
                "machine's administrator if you did not make it")
    return (f"GPU lock file {path}: owned by {_user(info.st_uid)} with mode {stat.S_IMODE(info.st_mode):04o}, "
            f"which you cannot open ({err.strerror}); its owner should remove it (or chmod 644 it)")


def _write_holder(fd: int, info: os.stat_result, holder: str) -> None:
    """Write the holder line into a lock file we own and that has no other name; else write nothing."""
    if info.st_uid != os.getuid() or info.st_nlink != 1:
        return
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
        return  # (our own file, but we may not write it: the line is only for messages)
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)


def _try_lock(dir_fd: int, folder: LockFolder, card: Card, holder: str) -> tuple[int, str] | None:
    name = f"{card.uuid}.lock"
    fd, info = _open_lock_file(dir_fd, folder, name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as err:
        os.close(fd)
        raise UnsafeLockFile(f"GPU lock file {os.path.join(folder.path, name)}: cannot be locked ({err}); "
                             "keep the lock folder on a local disk") from err
    _write_holder(fd, info, holder)
    return fd, os.path.join(folder.path, name)


def _holders(dir_fd: int, cards: Sequence[Card]) -> str:
    """Who holds each card, as the lock files say (for the wait and error messages)."""
    parts = []
    for card in cards:
        text = "?"
        try:
            fd = os.open(f"{card.uuid}.lock", os.O_RDONLY | _OPEN_FLAGS, dir_fd=dir_fd)
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    text = os.read(fd, 300).decode("utf-8", "replace").strip() or "?"
            finally:
                os.close(fd)
        except OSError:
            pass
        parts.append(f"card {card.index}: {text}")
    return "; ".join(parts)


def lock_card(
    cards: Sequence[Card], lock_dir: str | LockFolder, wait_s: float, job: str = "", poll_s: float = 1.0,
    report_every_s: float = 60.0,
) -> Assignment:
    """Lock the first free card of `cards`, waiting up to `wait_s` seconds for one to free up.

    lock_dir: a LockFolder, or a path checked by check_lock_folder."""
    folder = lock_dir if isinstance(lock_dir, LockFolder) else check_lock_folder(lock_dir)
    dir_fd = os.open(folder.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # judged again on the folder we opened: what we use is what we checked, not something swapped in
        folder = _judge_folder(folder.path, os.fstat(dir_fd))
        return _lock_in(dir_fd, folder, cards, wait_s, job, poll_s, report_every_s)
    finally:
        os.close(dir_fd)


def _lock_in(dir_fd: int, folder: LockFolder, cards: Sequence[Card], wait_s: float, job: str, poll_s: float,
             report_every_s: float) -> Assignment:
    holder = (f"pid {os.getpid()} of {_user(os.getuid())} on {socket.gethostname()}, {job or 'job'}, "
              f"since {time.strftime('%H:%M:%S')}")
    start = time.monotonic()
    last_report = None
    while True:
        for card in cards:
            got = _try_lock(dir_fd, folder, card, holder)
            if got:
                fd, path = got
                return Assignment("locked", card.uuid, card, path, _fd=fd)
        waited = time.monotonic() - start
        if waited >= wait_s:
            raise NoFreeGpu(
                f"no free GPU after waiting {waited:.0f} s: all {len(cards)} cards are locked "
                f"({_holders(dir_fd, cards)}; lock files in {folder.path}). Run fewer GPU jobs at once "
                f"(snakemake --resources gpu=N, N at most the number of free cards) or raise {ENV_WAIT}."
            )
        if last_report is None or time.monotonic() - last_report >= report_every_s:
            log.info("all %d cards are busy (%s); waiting up to %.0f s more for one",
                     len(cards), _holders(dir_fd, cards), wait_s - waited)
            last_report = time.monotonic()
        time.sleep(poll_s)


def assign_gpu(
    job: str = "", device: str = "auto", env: MutableMapping[str, str] = os.environ,
    cards: Sequence[Card] | None = None,
) -> Assignment:
    """Pick this job's card and set CUDA_VISIBLE_DEVICES; call before anything touches CUDA.

    Keep the returned Assignment alive for as long as the job uses the card.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised before the job chose its card; "
                           "call assign_gpu before any torch.cuda call")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if "SLURM_JOB_ID" in env:
        return Assignment("slurm", visible, slurm_job=env["SLURM_JOB_ID"])
    if device == "cpu":
        return Assignment("cpu", visible)
    if device.startswith("cuda:"):
        return Assignment("pinned", visible)
    if cards is None:
        cards = discover_cards(env)
    cards = allowed_cards(cards, visible)
    if not cards:
        return Assignment("none", visible)
    wait_s = float(env.get(ENV_WAIT, DEFAULT_WAIT_S))
    assignment = lock_card(cards, lock_folder(env), wait_s, job)
    env["CUDA_VISIBLE_DEVICES"] = assignment.card.uuid
    return assignment
