"""download_models: fetch model files named in the config from the Hugging Face hub.

Nothing is downloaded unless the config's `download` section names a file. Offline (no network,
or HF_HUB_OFFLINE=1) a download fails at once with the list of files still missing: where each
comes from (a URL) and where to put it, so they can be fetched on another machine.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

log = logging.getLogger(__name__)

# The files REFERENCE.md section 3 lists, and where they are published; used for hints only.
KNOWN_SOURCES = {
    "TurboWan2.2-I2V-A14B-high-720P.pth": "TurboDiffusion/TurboWan2.2-I2V-A14B-720P",
    "TurboWan2.2-I2V-A14B-low-720P.pth": "TurboDiffusion/TurboWan2.2-I2V-A14B-720P",
    "TurboWan2.2-I2V-A14B-high-720P-quant.pth": "TurboDiffusion/TurboWan2.2-I2V-A14B-720P",
    "TurboWan2.2-I2V-A14B-low-720P-quant.pth": "TurboDiffusion/TurboWan2.2-I2V-A14B-720P",
    "Wan2.1_VAE.pth": "Wan-AI/Wan2.1-T2V-1.3B",
    "models_t5_umt5-xxl-enc-bf16.pth": "Wan-AI/Wan2.1-T2V-1.3B",
}


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
    """The config's download section as HubFiles (dest = the model path the config names)."""
    files = []
    for role, entry in download.items():
        folder = "folder" in entry
        files.append(HubFile(role, entry["repo"], entry["folder"] if folder else entry["file"], models[role],
                             folder, entry.get("revision", "main")))
    return files


def instructions(files: list[HubFile]) -> str:
    lines = [f"  models.{f.role}: fetch {f.url}{' (the whole folder)' if f.folder else ''}\n"
             f"      and put it at {f.dest}" for f in files]
    return "\n".join(lines)


def download(item: HubFile, still_missing: list[HubFile]) -> None:
    """Fetch one file (or folder) to item.dest, atomically; DownloadError listing every missing file if offline."""
    dest = Path(item.dest)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise DownloadError(_offline_message("HF_HUB_OFFLINE is set", still_missing))
    unreachable = _unreachable()
    if unreachable:
        raise DownloadError(_offline_message(unreachable, still_missing))
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".download", dir=dest.parent))
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        log.info("fetching %s", item.url)
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
        raise DownloadError(_offline_message(f"{type(err).__name__}: {err}", still_missing)) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
