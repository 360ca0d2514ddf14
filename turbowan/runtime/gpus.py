"""One GPU per job on a box with several: a lock file per card, taken before CUDA starts.

Snakemake's `--resources gpu=N` only counts GPU jobs; it does not say which card a job should
use, so without this every job would land on card 0. Each GPU job therefore locks one free card
(`fcntl.flock` on `<lock dir>/<card uuid>.lock`) and sets `CUDA_VISIBLE_DEVICES` to that card's
UUID before torch initialises CUDA. The job then sees exactly one device, `cuda` (index 0), so
its code, and the noise its generator draws, are the same whichever card it got. The kernel
drops a flock when the process dies, however it dies, so a killed job never keeps its card.
The lock directory is per machine, not per batch: two batches on one box share the cards too.

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
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Sequence

log = logging.getLogger(__name__)

DEFAULT_LOCK_DIR = "/tmp/turbowan-gpu-locks"
DEFAULT_WAIT_S = 3600.0
ENV_CARDS = "TURBOWAN_GPUS"
ENV_LOCK_DIR = "TURBOWAN_GPU_LOCK_DIR"
ENV_WAIT = "TURBOWAN_GPU_WAIT_S"


class NoFreeGpu(RuntimeError):
    """Every card this job may use stayed locked by other jobs for the whole wait."""


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


def _try_lock(lock_dir: str, card: Card, holder: str) -> tuple[int, str] | None:
    path = os.path.join(lock_dir, f"{card.uuid}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, holder.encode())
    return fd, path


def _holders(lock_dir: str, cards: Sequence[Card]) -> str:
    """Who holds each card, as the lock files say (for the wait and error messages)."""
    parts = []
    for card in cards:
        try:
            with open(os.path.join(lock_dir, f"{card.uuid}.lock"), encoding="utf-8") as f:
                parts.append(f"card {card.index}: {f.read().strip() or '?'}")
        except OSError:
            parts.append(f"card {card.index}: ?")
    return "; ".join(parts)


def lock_card(
    cards: Sequence[Card], lock_dir: str, wait_s: float, job: str = "", poll_s: float = 1.0,
    report_every_s: float = 60.0,
) -> Assignment:
    """Lock the first free card of `cards`, waiting up to `wait_s` seconds for one to free up."""
    os.makedirs(lock_dir, exist_ok=True)
    holder = f"pid {os.getpid()} on {socket.gethostname()}, {job or 'job'}, since {time.strftime('%H:%M:%S')}"
    start = time.monotonic()
    last_report = None
    while True:
        for card in cards:
            got = _try_lock(lock_dir, card, holder)
            if got:
                fd, path = got
                return Assignment("locked", card.uuid, card, path, _fd=fd)
        waited = time.monotonic() - start
        if waited >= wait_s:
            raise NoFreeGpu(
                f"no free GPU after waiting {waited:.0f} s: all {len(cards)} cards are locked "
                f"({_holders(lock_dir, cards)}; lock files in {lock_dir}). Run fewer GPU jobs at once "
                f"(snakemake --resources gpu=N, N at most the number of free cards) or raise {ENV_WAIT}."
            )
        if last_report is None or time.monotonic() - last_report >= report_every_s:
            log.info("all %d cards are busy (%s); waiting up to %.0f s more for one",
                     len(cards), _holders(lock_dir, cards), wait_s - waited)
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
    lock_dir = env.get(ENV_LOCK_DIR, DEFAULT_LOCK_DIR)
    wait_s = float(env.get(ENV_WAIT, DEFAULT_WAIT_S))
    assignment = lock_card(cards, lock_dir, wait_s, job)
    env["CUDA_VISIBLE_DEVICES"] = assignment.card.uuid
    return assignment
