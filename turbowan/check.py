"""`turbowan check`: find a batch's damaged artifacts; with `--repair`, remove them.

Snakemake sees only that a file exists, so a truncated copy, a full disk or a hand edit leaves an
artifact that looks finished. The job that reads it fails, naming it; this command finds every such
file at once without running anything: safetensors artifacts by their header and the digest of
their data, frames (and kept last frames) by their PNG chunks and count, videos (and chain videos)
by their boxes and frame count. It only looks,
unless asked to repair: then it deletes each damaged file, and the next run remakes it (and, as
their input is newer, everything made from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .files.artifacts import check_digest, read_record
from .files.video import VideoError, check_frames, check_mp4, check_png
from .layout import Layout
from .sheet import chains, continues


@dataclass(frozen=True)
class Damage:
    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def artifact_problem(path: Path, stage: str) -> str | None:
    """Why a stage's safetensors artifact cannot be used, or None."""
    problem = check_digest(path)
    if problem:
        return problem
    written_by = read_record(path).get("stage")
    return None if written_by == stage else f"was written by stage {written_by!r}, not {stage}"


def file_problem(check, path: Path, row) -> str | None:
    """Why a row's frames folder or video fails `check` (check_frames, check_mp4), or None."""
    try:
        check(path, row.num_frames, row.width, row.height)
    except VideoError as err:
        return str(err).removeprefix(f"{path}: ")
    return None


def find_damage(results: str | Path, rows: Iterable) -> list[Damage]:
    """Every existing artifact of the sheet's rows that is damaged (missing ones are not: Snakemake
    makes those)."""
    layout = Layout(str(results))
    found: list[Damage] = []
    texts_seen: set[str] = set()
    rows = list(rows)
    for row in rows:
        checks = []
        if row.prompt_key not in texts_seen:
            texts_seen.add(row.prompt_key)
            checks.append((Path(layout.text(row.prompt_key)), lambda p: artifact_problem(p, "encode_prompt")))
        for stage in ("encode_image", "sample_high", "sample_low"):
            checks.append((Path(layout.artifact(stage, row.id)), lambda p, s=stage: artifact_problem(p, s)))
        checks.append((Path(layout.frames(row.id)), lambda p, r=row: file_problem(check_frames, p, r)))
        checks.append((Path(layout.video(row.id)), lambda p, r=row: file_problem(check_mp4, p, r)))
        checks.append((Path(layout.last_frame(row.id)), lambda p, r=row: file_problem(_check_one_png, p, r)))
        for path, problem_of in checks:
            if path.exists():
                problem = problem_of(path)
                if problem:
                    found.append(Damage(path, problem))
    for name, members in chains(rows).items():
        path = Path(layout.chain(name))
        if path.exists():
            frames = sum(row.num_frames for row in members) - sum(continues(members))
            try:
                check_mp4(path, frames, members[0].width, members[0].height)
            except VideoError as err:
                found.append(Damage(path, str(err).removeprefix(f"{path}: ")))
    return found


def _check_one_png(path: Path, _frames: int, width: int, height: int) -> None:
    check_png(path, width, height)


def repair(damage: Iterable[Damage]) -> list[Path]:
    """Delete each damaged file (a frames folder whole); returns what was removed."""
    import shutil

    removed = []
    for item in damage:
        if item.path.is_dir():
            shutil.rmtree(item.path)
        elif item.path.exists():
            item.path.unlink()
        removed.append(item.path)
    return removed
