"""Per-user private folders for what must not be shared on a multi-user machine: card locks,
worker sockets, the compilers' caches.

A fixed name in /tmp can be made first by another user, who then owns what we put there (or
plants links in it). So every such folder lives under a base only this user can reach,
`$XDG_CACHE_HOME/turbowan` (`~/.cache/turbowan`). One base whatever the session: a job started
from cron and one from a login shell must find the same card locks and the same workers (a login
session's `$XDG_RUNTIME_DIR` would not be there for the first). A folder that exists already is
used only when it is a real folder (not a link), owned by this user, and not open to others.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Mapping


class UnsafeFolder(RuntimeError):
    """A folder we would put private files in belongs to someone else or is open to others."""


def _check_private(path: Path) -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeFolder(f"{path}: expected a folder of our own, found a link or a file; remove it")
    if info.st_uid != os.getuid():
        raise UnsafeFolder(f"{path}: belongs to uid {info.st_uid}, not to you (uid {os.getuid()}); "
                           "another user made it first: remove it or choose another folder")
    if info.st_mode & 0o077:
        raise UnsafeFolder(f"{path}: others may read or write it (mode {stat.S_IMODE(info.st_mode):o}); "
                           "chmod 700 it or remove it")


def ensure_private(path: str | os.PathLike) -> Path:
    """Create `path` (and missing parents) mode 0700, or check that the existing one is ours alone."""
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    _check_private(path)
    return path


def private_base(env: Mapping[str, str] = os.environ) -> Path:
    """This user's private base folder (created on first use)."""
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return ensure_private(Path(cache) / "turbowan")


def private_dir(name: str, env: Mapping[str, str] = os.environ) -> Path:
    """A named private folder under private_base(): "locks", "workers", "inductor", ..."""
    return ensure_private(private_base(env) / name)


def compiler_cache_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR in private folders, unless the user set them:
    torch's default, /tmp/torchinductor_<user>, is created without an owner check, so another user
    who made it first could swap the compiled code our jobs load."""
    wanted = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}
    return {var: str(private_dir(name, env)) for var, name in wanted.items() if not env.get(var)}
