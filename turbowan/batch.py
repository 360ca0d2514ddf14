"""One job, many rows: a stage job that loads its model once and serves a group of rows.

Snakemake deletes a job's outputs before it runs the job, and a job that fails loses all of them.
So each row's result is first written to a store, `<results>/.store/<stage>/<key>`, where the key
is a hash of everything that determines the result (the stage, its parameters, and the contents
of its upstream files and model files), then hard-linked to the row's declared output. A rerun of
the group finds every unchanged row in the store and links it again (the same file) without
loading a model; a crash loses only the row in flight.

A row that fails while others in its group succeed gets a failure record at its output (an
artifact of stage "failed"), so the group job succeeds, the other rows go on, the row's later
stages pass the record along, and its last stage fails with the original error. The next run
removes the records (`turbowan.files.artifacts.sweep`) and retries those rows. When every row of a job
fails (with one row per group: always) the job itself fails, as a plain per-row job would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .files.artifacts import atomic_dir, check_digest, failure_record, fingerprint, remove, write_failure
from .jobs import injected_fault

log = logging.getLogger("turbowan.batch")


@dataclass
class RowTask:
    """One row of a group job: where its result goes and what determines it.

    params and inputs are what the stage records in the artifact's provenance; the store key is a
    hash of them (inputs by content), so anything that changes the result changes the key.
    """

    key: str  # the row id, or the prompt key for encode_prompt: names the row's log
    out: str
    params: dict[str, Any]
    inputs: dict[str, str]
    values: dict[str, Any] = field(default_factory=dict)  # what the computation needs besides


class RowFailed(RuntimeError):
    """Every row of a group job failed; the job fails as a whole."""


def store_key(stage: str, params: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """sha256 over the stage, its parameters and its inputs' fingerprints (content, not mtime)."""
    described = {"stage": stage, "params": dict(params), "inputs": {k: fingerprint(p) for k, p in inputs.items()}}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def store_entry(store: str | os.PathLike, stage: str, task: RowTask) -> Path:
    """Where a task's result lives in the store: `<store>/<stage>/<key>`."""
    return Path(store, stage, store_key(stage, task.params, task.inputs))


def link_into(entry: Path, out: Path) -> None:
    """Make `out` the same file (or folder of files) as the store entry: hard links, else copies."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if entry.is_dir():
        with atomic_dir(out, mode=entry.stat().st_mode & 0o777) as tmp:
            for item in entry.iterdir():
                _link_or_copy(item, tmp / item.name)
        return
    tmp = out.with_name(f".{out.name}.link.partial")
    tmp.unlink(missing_ok=True)
    _link_or_copy(entry, tmp)
    os.replace(tmp, out)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links: a copy (the store then holds a second copy)
        shutil.copy2(source, target)


def damaged(entry: Path) -> str | None:
    """Why a store entry cannot be reused (a file changed in place through one of its links), or None."""
    if entry.is_dir():  # frames
        from .files.video import VideoError, load_frames  # (not at the top: the Snakefile imports this module)

        try:
            load_frames(entry)
        except VideoError as err:
            return str(err)
        return None
    with open(entry, "rb") as f:
        is_safetensors = f.read(8) != b"" and f.read(1) == b"{"
    if is_safetensors:
        return check_digest(entry)
    return None if entry.stat().st_size > 0 else "is empty"


@contextmanager
def row_log(key: str, job_log: str | None) -> Iterator[None]:
    """Copy what happens to one row into its own log, `<key>.log` beside the job's log (where
    summaries look), unless that is the job's log already (a group of one)."""
    path = Path(job_log).with_name(f"{key}.log") if job_log else None
    if path is None or path == Path(job_log):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


class Lookahead:
    """work(task) on a worker thread, one row ahead: asking for a row's result first starts the work
    of the next row that will need it (`needed`), which then runs while the asking thread finishes
    the row it asked for. A row's work started ahead and never asked for is left unused."""

    def __init__(self, pool: Executor, work: Callable[[RowTask], Any], tasks: list[RowTask],
                 needed: Callable[[RowTask], bool]):
        self._pool, self._work, self._tasks, self._needed = pool, work, tasks, needed
        self._position = {t.key: i for i, t in enumerate(tasks)}
        self._started: dict[str, Future] = {}

    def result(self, task: RowTask) -> Any:
        future = self._started.pop(task.key, None) or self._pool.submit(self._work, task)
        later = self._tasks[self._position[task.key] + 1:]
        upcoming = next((t for t in later if self._needed(t)), None)
        if upcoming is not None and upcoming.key not in self._started:
            self._started[upcoming.key] = self._pool.submit(self._work, upcoming)
        return future.result()


def run_group(stage: str, tasks: list[RowTask], compute, store, job_log=None, on_done=None) -> None:
    """A stage's rows through run_rows; without a store (a direct call, a test), computed straight
    into their outputs."""
    if store is None:
        for task in tasks:
            compute(task, Path(task.out))
        return
    run_rows(stage, tasks, compute, store, job_log, on_done)


def run_rows(
    stage: str,
    tasks: list[RowTask],
    compute: Callable[[RowTask, Path], None],
    store: str | os.PathLike,
    job_log: str | None = None,
    on_done: Callable[[RowTask], None] | None = None,
) -> dict[str, str]:
    """Give every task its output: linked from the store when it is there, else computed into it.

    compute(task, path) writes the row's result at `path` (atomically). on_done(task), if given, is
    called once a row's output is in place (it must not raise). Returns {key: what happened}
    ("computed", "reused", "failed", "upstream failed").
    """
    outcome: dict[str, str] = {}
    failures: dict[str, tuple[RowTask, str]] = {}
    for number, task in enumerate(tasks, 1):
        out = Path(task.out)
        with row_log(task.key, job_log):
            upstream = next((rec for p in task.inputs.values() if (rec := failure_record(p))), None)
            if upstream:
                write_failure(out, upstream["failed_stage"], task.key, upstream["error"])
                log.error("row %s: not run, its %s stage failed: %s", task.key, upstream["failed_stage"],
                          upstream["error"])
                outcome[task.key] = "upstream failed"
                continue
            started = time.perf_counter()
            try:
                entry = store_entry(store, stage, task)
                if entry.exists() and (problem := damaged(entry)):
                    log.warning("row %s: the stored result %s %s; computing it again", task.key, entry, problem)
                    remove(entry)
                if entry.exists():
                    link_into(entry, out)
                    log.info("row %s (%d/%d): %s reused from the store (%s)", task.key, number, len(tasks), stage,
                             entry.name)
                    outcome[task.key] = "reused"
                else:
                    log.info("row %s (%d/%d): %s", task.key, number, len(tasks), stage)
                    injected_fault(stage, task.key)
                    entry.parent.mkdir(parents=True, exist_ok=True)
                    compute(task, entry)
                    link_into(entry, out)
                    log.info("row %s: %s done in %.1f s", task.key, stage, time.perf_counter() - started)
                    outcome[task.key] = "computed"
                if on_done:
                    on_done(task)
            except Exception as err:  # noqa: BLE001 - one row's failure must not lose the others
                log.exception("row %s: %s failed after %.1f s", task.key, stage, time.perf_counter() - started)
                failures[task.key] = (task, f"{err.__class__.__name__}: {err}")
                outcome[task.key] = "failed"
    if failures:
        if not any(state in ("computed", "reused") for state in outcome.values()):
            raise RowFailed(f"{stage}: every row failed: " + "; ".join(f"{k}: {e}" for k, (_, e) in failures.items()))
        for key, (task, error) in failures.items():
            write_failure(Path(task.out), stage, key, error)
        log.error("%s: %d of %d rows failed (%s); the others go on, and the next run retries these",
                  stage, len(failures), len(tasks), ", ".join(failures))
    return outcome


def collect_garbage(store: str | os.PathLike) -> tuple[int, int]:
    """Remove store entries that no output links to any more (rows changed or gone, temporary frames
    consumed); call it only after a run that succeeded. Returns (entries, bytes) removed.

    An entry's files have one link (the store's own) once nothing else holds them. On a file system
    without hard links every entry looks unused; that only costs recomputing after a later failure.
    """
    removed = freed = 0
    for stage in Path(store).glob("*"):
        for entry in stage.iterdir() if stage.is_dir() else ():
            files = list(entry.iterdir()) if entry.is_dir() else [entry]
            stats = [f.stat() for f in files]
            if all(st.st_nlink == 1 for st in stats):
                remove(entry)
                removed += 1
                freed += sum(st.st_size for st in stats)
    return removed, freed


__all__ = ["collect_garbage", "RowFailed", "RowTask", "link_into", "run_rows", "store_entry", "store_key"]
