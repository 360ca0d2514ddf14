"""Stage artifacts: safetensors files written atomically, with a record of what made them.

Every artifact's header carries one metadata entry, `turbowan`, a JSON object with the stage
that wrote it, the parameters that determine it, package versions, and a fingerprint of each
upstream file. Readers check tensors, shapes, dtypes and parameters before using a file, so a
stale or broken artifact stops the job with a message naming the file instead of making a wrong
video. Nothing here unpickles anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:  # torch is imported where tensors are handled: the CPU jobs never need it
    import torch

META_KEY = "turbowan"
# Files larger than this (model checkpoints) are fingerprinted by size and mtime, not hashed.
HASH_LIMIT_BYTES = 512 * 1024**2


# What a reader that found a broken upstream file tells the user to do (it never moves files itself).
REMAKE_HINT = "`turbowan check --repair` removes it and what was made from it; then rerun"


class ArtifactError(RuntimeError):
    """An artifact is missing, broken, or does not fit the job that reads it."""


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers (read from metadata: importing is slow)."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    import torch

    versions = {"turbowan": __version__, "torch": torch.__version__}
    for name in ("diffusers", "transformers", "turbodiffusion"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies an upstream file: sha256 for artifacts, size+mtime for huge checkpoints."""
    path = Path(path)
    stat = path.stat()
    if path.is_dir():
        return {"path": str(path), "kind": "directory"}
    return {"path": str(path), **_content_id(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)}


@lru_cache(maxsize=4096)
def _content_id(path: str, size: int, mtime_ns: int, inode: int) -> dict[str, Any]:
    """Hash a file once per job (a group job fingerprints the same VAE for every row); the key holds
    what would change if the file did."""
    if size > HASH_LIMIT_BYTES:
        return {"size": size, "mtime_ns": mtime_ns}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _read_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc/self/status, 4.7+);
    elsewhere set and restored once, at import, before any thread of ours writes files."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


# Read once: os.umask can only be read by setting it, and a set applies to the whole process, so
# a thread creating a file meanwhile would get whatever was set (0666 files under umask 0).
_UMASK = _read_umask()


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the process's umask (read at import;
    never changed here)."""
    return (0o777 if directory else 0o666) & ~_UMASK


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a folder's entries (a rename into it, a new file) durable: fsync the folder itself."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # (file systems that cannot sync a folder)
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Write a file's data and size to disk (a read-only descriptor syncs the file all the same)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under `folder`, then every folder of it (deepest first), the folder last."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(root)


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it to `final` only if the block succeeds.

    A killed job leaves at most a hidden `.name.*.partial` file, never a file under the final name.
    Durable: the file is synced before the rename and the folder after it, so after a power cut
    `final` is either the old file or the whole new one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.chmod(tmp_path, default_mode())
        os.replace(tmp_path, final)
        fsync_dir(final.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(final: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; it replaces `final` whole only if the block succeeds.

    mode: the folder's permissions (default: what mkdir would give under the current umask).
    Durable: every file inside and the folder are synced before the rename, the parent after it; an
    old `final` is moved aside and removed only once the new one is in place.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, default_mode(directory=True) if mode is None else mode)
        fsync_tree(tmp)
        if final.exists() or final.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / final.name)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old / final.name, final)  # (put the old one back)
                raise
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def data_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: detects corruption inside the data."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def quick_check(path: str | os.PathLike) -> str | None:
    """Why an artifact is incomplete or not ours, from its header and size alone (cheap), or None."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            if header_len > 100 * 1024**2:
                return "header length is implausible"
            header = json.loads(f.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        expected = 8 + header_len + max(ends, default=0)
        if path.stat().st_size != expected:
            return f"is {path.stat().st_size} bytes, its header says {expected} (truncated or padded)"
        if META_KEY not in (header.get("__metadata__") or {}):
            return f"has no '{META_KEY}' record"
    except (OSError, struct.error, ValueError, KeyError, TypeError) as err:
        return f"cannot be parsed as safetensors ({err.__class__.__name__}: {err})"
    return None


def check_digest(path: str | os.PathLike) -> str | None:
    """Why an artifact's data does not match its recorded digest (or its header is broken), or None.
    Reads the whole file: for reusing a stored result, where a flipped bit must not travel on."""
    problem = quick_check(path)
    if problem:
        return problem
    try:
        record = read_record(path)
        with safe_open(str(path), framework="pt", backend="pread") as f:  # (leaves nothing mapped)
            stored = f.get_tensors()
    except (ArtifactError, SafetensorError, OSError) as err:
        return str(err)
    if record.get("data_sha256") != data_digest(stored):
        return "its data does not match the digest recorded when it was written"
    return None


def save_artifact(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    stage: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike] | None = None,
) -> None:
    """Write tensors + provenance to `path` atomically."""
    from safetensors.torch import save_file

    record = {
        "stage": stage,
        "data_sha256": data_digest(tensors),
        "params": dict(params),
        "inputs": {name: fingerprint(p) for name, p in (inputs or {}).items()},
        "versions": package_versions(),
    }
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={META_KEY: json.dumps(record, sort_keys=True)})


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance record of an artifact (without reading its tensors)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", backend="pread") as f:  # (reads the header only)
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: not a readable safetensors file ({err})") from err
    if META_KEY not in meta:
        raise ArtifactError(f"{path}: has no '{META_KEY}' record; it was not written by this pipeline")
    try:
        return json.loads(meta[META_KEY])
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: its '{META_KEY}' record is not valid JSON ({err})") from err


def load_artifact(
    path: str | os.PathLike,
    stage: str,
    expect: Mapping[str, tuple[tuple[int | None, ...] | None, torch.dtype]],
    params: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an artifact and check it: stage, tensor names, shapes (None = any), dtypes, params.

    Raises ArtifactError naming the file and what does not fit.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: missing")
    record = read_record(path)
    if record.get("stage") != stage:
        raise ArtifactError(f"{path}: written by stage {record.get('stage')!r}, expected {stage!r}")
    try:
        # pread: each tensor is read into memory of its own and nothing of the file stays mapped
        # (safetensors' default backend, "mmap", gives views of a private mapping of the file)
        with safe_open(str(path), framework="pt", backend="pread") as f:
            stored = f.get_tensors()
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{path}: broken safetensors file ({err}); {REMAKE_HINT}") from err
    if record.get("data_sha256") != data_digest(stored):
        raise ArtifactError(
            f"{path}: corrupt (its data does not match the digest recorded when it was written); {REMAKE_HINT}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in expect.items():
        if name not in stored:
            raise ArtifactError(f"{path}: has no tensor {name!r} (has {sorted(stored)})")
        tensor = stored[name]
        if tensor.dtype != dtype:
            raise ArtifactError(f"{path}: tensor {name!r} is {tensor.dtype}, expected {dtype}")
        if shape is not None and (
            len(shape) != tensor.dim() or any(s is not None and s != d for s, d in zip(shape, tensor.shape))
        ):
            raise ArtifactError(f"{path}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
        tensors[name] = tensor.to(device)
    if params:
        check_params(path, record, params)
    return tensors, record


def check_params(path: str | os.PathLike, record: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    recorded = record.get("params", {})
    for key, value in params.items():
        if key not in recorded:
            raise ArtifactError(f"{path}: records no parameter {key!r}; expected {value!r}")
        if recorded[key] != value:
            raise ArtifactError(
                f"{path}: was made with {key}={recorded[key]!r}, but this job needs {key}={value!r}; "
                "delete it (or rerun with --forcerun) to recompute"
            )


def check_made_from(path: str | os.PathLike, record: Mapping[str, Any], name: str, upstream: str | os.PathLike) -> None:
    """Check that `path` was made from the current contents of `upstream`."""
    made_from = record.get("inputs", {}).get(name)
    if made_from is None:
        raise ArtifactError(f"{path}: records no upstream {name!r}")
    now = fingerprint(upstream)
    if made_from.get("sha256") and made_from.get("sha256") != now.get("sha256"):
        raise ArtifactError(
            f"{path}: was made from a different {name} than {upstream} holds now; rerun to recompute it"
        )
