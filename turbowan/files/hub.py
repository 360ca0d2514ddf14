"""download_models: fetch model files named in the config from the Hugging Face hub.

Nothing is downloaded unless the config's `download` section names a file. Offline (no network,
or HF_HUB_OFFLINE=1) a download fails at once with the list of files still missing: where each
comes from (a URL) and where to put it, so they can be fetched on another machine.

Every download names the commit it fetches: a branch like `main` moves, and a rerun (or a second
machine) would silently get other weights. A config entry takes its `revision` from the entry, else
from the pinned table below; an entry with neither is refused, asking for a commit id (or an
explicit `revision: main`, to follow the branch knowingly).

A download that fails (a dropped connection half way through a 28 GB checkpoint) keeps what it
fetched: huggingface_hub downloads into a staging folder beside the destination,
`.<name>.download/`, that is left in place on failure and used again by the next attempt, so
whatever partial files the installed huggingface_hub keeps there (its `.incomplete` files; the Xet
client's cache) are there to resume from. It is removed once the file is in place.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

from ..private import ensure_private

log = logging.getLogger(__name__)

COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class KnownFile:
    """A published file (or folder) users need (docs/reference.md, "Checkpoint files") and the commit it is pinned to."""

    repo: str
    path: str
    revision: str | None  # a 40-hex commit id; None: not pinned yet
    folder: bool = False


# The files of docs/reference.md, "Checkpoint files", where they are published, and the commit each is pinned
# to. revision None means not pinned yet: this table was written without access to the hub, and a
# commit id that was not looked up must not be made up. To pin one, take the commit id from
# https://huggingface.co/<repo>/commits/main (or `git ls-remote https://huggingface.co/<repo> main`)
# after checking the file there; until then a config entry for it must give its own `revision`.
KNOWN_FILES: dict[str, KnownFile] = {
    "TurboWan2.2-I2V-A14B-high-720P.pth":
        KnownFile("TurboDiffusion/TurboWan2.2-I2V-A14B-720P", "TurboWan2.2-I2V-A14B-high-720P.pth", None),
    "TurboWan2.2-I2V-A14B-low-720P.pth":
        KnownFile("TurboDiffusion/TurboWan2.2-I2V-A14B-720P", "TurboWan2.2-I2V-A14B-low-720P.pth", None),
    "TurboWan2.2-I2V-A14B-high-720P-quant.pth":
        KnownFile("TurboDiffusion/TurboWan2.2-I2V-A14B-720P", "TurboWan2.2-I2V-A14B-high-720P-quant.pth", None),
    "TurboWan2.2-I2V-A14B-low-720P-quant.pth":
        KnownFile("TurboDiffusion/TurboWan2.2-I2V-A14B-720P", "TurboWan2.2-I2V-A14B-low-720P-quant.pth", None),
    "Wan2.1_VAE.pth": KnownFile("Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1_VAE.pth", None),
    "models_t5_umt5-xxl-enc-bf16.pth": KnownFile("Wan-AI/Wan2.1-T2V-1.3B", "models_t5_umt5-xxl-enc-bf16.pth", None),
    "google/umt5-xxl": KnownFile("Wan-AI/Wan2.1-T2V-1.3B", "google/umt5-xxl", None, folder=True),
}

# File name -> hub repository, for the hints of a missing model file.
KNOWN_SOURCES = {name: known.repo for name, known in KNOWN_FILES.items() if not known.folder}


def pinned_revision(repo: str, path: str) -> str | None:
    """The commit the table pins `path` of `repo` to, or None."""
    for known in KNOWN_FILES.values():
        if known.repo == repo and known.path == path.strip("/"):
            return known.revision
    return None


class DownloadError(RuntimeError):
    """A model file could not be fetched."""


@dataclass(frozen=True)
class HubFile:
    """One configured download: `file` (or a `folder`, for the tokenizer) of a hub repository -> dest."""

    role: str
    repo: str
    path: str
    dest: str
    folder: bool = False
    revision: str = "main"

    @property
    def url(self) -> str:
        kind = "tree" if self.folder else "resolve"
        return f"https://huggingface.co/{self.repo}/{kind}/{self.revision}/{self.path}"


def hub_files(models: Mapping[str, str], download: Mapping[str, Mapping[str, str]]) -> list[HubFile]:
    """The config's download section as HubFiles (dest = the model path the config names).

    Each entry's revision: its own `revision`, else the pinned table's; DownloadError listing every
    entry that has neither."""
    files, unpinned = [], []
    for role, entry in download.items():
        folder = "folder" in entry
        path = entry["folder"] if folder else entry["file"]
        revision = str(entry["revision"]).strip() if entry.get("revision") else pinned_revision(entry["repo"], path)
        if not revision:
            unpinned.append(f"  download.{role} ({entry['repo']}, {path}): add revision: <the 40-hex commit id>, "
                            f"from https://huggingface.co/{entry['repo']}/commits/main")
            continue
        files.append(HubFile(role, entry["repo"], path, models[role], folder, revision))
    if unpinned:
        raise DownloadError(
            "the config's download section names files without a revision; name the commit to fetch, so "
            "that every run and machine gets the same weights (or write revision: main to follow the "
            "branch, knowing a later download may differ):\n" + "\n".join(unpinned))
    return files


def instructions(files: list[HubFile]) -> str:
    lines = [f"  models.{f.role}: fetch {f.url}{' (the whole folder)' if f.folder else ''}\n"
             f"      and put it at {f.dest}" for f in files]
    return "\n".join(lines)


def staging_folder(item: HubFile) -> Path:
    """Where item is downloaded before it is moved to item.dest: the same folder every attempt (what
    a failed attempt fetched stays there for the next), private to this user."""
    dest = Path(item.dest)
    return dest.parent / f".{dest.name}.download"


def download(item: HubFile, still_missing: list[HubFile]) -> None:
    """Fetch one file (or folder) to item.dest, atomically; DownloadError listing every missing file if offline.

    A failed attempt leaves its staging folder (and whatever partial files huggingface_hub keeps
    in it) for the next attempt to resume from."""
    dest = Path(item.dest)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise DownloadError(_offline_message("HF_HUB_OFFLINE is set", still_missing))
    unreachable = _unreachable()
    if unreachable:
        raise DownloadError(_offline_message(unreachable, still_missing))
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(item)
    if staging.is_dir() and any(staging.iterdir()):
        log.info("%s holds what an earlier attempt fetched; resuming from it", staging)
    ensure_private(staging)  # (not a link or another user's folder)
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        log.info("fetching %s", item.url)
        if not COMMIT.match(item.revision):
            log.warning("revision %r is not a commit id: this fetches whatever it points to now", item.revision)
        if item.folder:
            snapshot_download(item.repo, revision=item.revision, allow_patterns=[f"{item.path}/*"], local_dir=staging)
            fetched = staging / item.path
            if not fetched.is_dir() or not any(fetched.iterdir()):
                raise DownloadError(f"{item.url}: no such folder in {item.repo}")
        else:
            fetched = Path(hf_hub_download(item.repo, item.path, revision=item.revision, local_dir=staging))
        os.replace(fetched, dest)
        log.info("saved %s", dest)
    except DownloadError:
        raise
    except Exception as err:  # no network, unknown repo/file, refused: say what to fetch by hand
        raise DownloadError(
            _offline_message(f"{type(err).__name__}: {err}", still_missing)
            + f"\n(What was fetched so far stays in {staging}: the next attempt resumes from it.)") from err
    shutil.rmtree(staging, ignore_errors=True)  # only once the file is in place


def _unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached (a quick TCP connect; huggingface_hub itself retries for ~20 s), or None.

    Skipped behind a proxy, where only the proxy knows."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"{endpoint.hostname}:{port} is not reachable: {err}"
    return None


def _offline_message(reason: str, files: list[HubFile]) -> str:
    return (f"cannot download model files ({reason}).\nFetch these files on a machine with internet access "
            f"and put them here (then rerun):\n{instructions(files)}")
