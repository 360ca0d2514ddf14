"""The batch's status table: for every sheet row, each stage's state, error, output and time.

Built only from what a run leaves on disk (outputs, job logs, Snakemake benchmarks), so it can be
rebuilt at any time: by the Snakefile's end-of-run handlers (also after --keep-going failures),
by the gallery, and by `turbowan status`. Nothing here needs Snakemake.

A stage is `done` when its output exists, `failed` when its log ends in an error (the output of a
failed job is removed by Snakemake), and `missing` otherwise (not run yet, or skipped because an
upstream stage failed).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from ..files.artifacts import atomic_path
from ..layout import STAGES, Layout
from ..loras import format_loras

DONE, FAILED, MISSING = "done", "failed", "missing"
SUMMARY_NAME = "summary.csv"
ERROR_WORDS = 160  # characters of an error message kept in the table

# The last line of a Python traceback: "package.module.SomeError: message" (or a bare name).
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))\b:?\s*(.*)$")
_FAILED_AFTER = re.compile(r"failed after ([0-9.]+) s")
_DONE_IN = re.compile(r"\bdone in ([0-9.]+) s")

# What an expert's loader logs when a stage runs on a CUDA GPU but turbodiffusion's kernels are
# missing, so SLA attention and the int8 linears run in plain torch (right, but much slower).
KERNEL_STAGES = ("sample_high", "sample_low")
_PLAIN_TORCH_ON_GPU = re.compile(r"kernels: plain-torch fallback on cuda \((.*)\)\s*$")
PLAIN_TORCH_WARNING = "GPU run used plain-torch SLA/int8 kernels (turbodiffusion not installed): slower"


class RowLike(Protocol):
    id: str
    prompt: str

    @property
    def prompt_key(self) -> str: ...


@dataclass(frozen=True)
class RowRef:
    """The least a summary needs of a row (what `turbowan status` reads back from summary.csv)."""

    id: str
    prompt: str
    prompt_key: str


def stage_key(row: RowLike, stage: str) -> str:
    """The name a stage's log and benchmark are filed under: the prompt key or the row id."""
    return row.prompt_key if stage == "encode_prompt" else row.id


def stage_output(results: str | Path, row: RowLike, stage: str) -> Path:
    layout = Layout(str(results))
    return Path(layout.text(row.prompt_key) if stage == "encode_prompt" else layout.artifact(stage, row.id))


def log_file(results: str | Path, rule: str, key: str) -> Path:
    return Path(Layout(str(results)).log(rule, key))


def benchmark_file(results: str | Path, rule: str, key: str) -> Path:
    return Path(Layout(str(results)).benchmark(rule, key))


def last_error(log_text: str) -> str | None:
    """The last exception line of a job log, shortened ("ArtifactError: x.safetensors: ..."), or None."""
    for line in reversed(log_text.splitlines()):
        match = _EXCEPTION_LINE.match(line.strip())
        if match:
            name, message = match.groups()
            text = f"{name}: {message}" if message else name
            return text if len(text) <= ERROR_WORDS else text[: ERROR_WORDS - 1] + "…"
    return None


def benchmark_seconds(path: str | Path) -> float | None:
    """Wall-clock seconds from a Snakemake benchmark TSV (column `s`; the mean over repeats)."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        values = [float(rec["s"]) for rec in csv.DictReader(f, delimiter="\t") if rec.get("s") not in (None, "", "NA")]
    return sum(values) / len(values) if values else None


@dataclass
class StageStatus:
    state: str
    seconds: float | None = None
    error: str | None = None
    output: str = ""


def stage_status(results: str | Path, row: RowLike, stage: str) -> StageStatus:
    key = stage_key(row, stage)
    output = stage_output(results, row, stage)
    log_text = ""
    log = log_file(results, stage, key)
    if log.is_file():
        log_text = log.read_text(encoding="utf-8", errors="replace")
    exists = output.exists()
    if stage == "decode" and not exists:
        # Frames are temporary: once the mp4 is made from them Snakemake deletes them.
        exists = stage_output(results, row, "encode_video").exists()
    if exists:
        seconds = benchmark_seconds(benchmark_file(results, stage, key))
        if seconds is None and (match := _DONE_IN.search(log_text)):
            seconds = float(match[1])
        return StageStatus(DONE, seconds, None, str(output))
    error = last_error(log_text)
    if error:
        match = _FAILED_AFTER.search(log_text)
        return StageStatus(FAILED, float(match[1]) if match else None, error, str(output))
    return StageStatus(MISSING, None, None, str(output))


def plain_torch_kernels(log_text: str) -> str | None:
    """What a job log says ran in plain torch on a GPU (the loader's 'kernels: plain-torch fallback on
    cuda (...)' line, the part in brackets), or None."""
    for line in log_text.splitlines():
        match = _PLAIN_TORCH_ON_GPU.search(line)
        if match:
            return match[1].strip() or "plain torch"
    return None


def row_kernels(results: str | Path, row: RowLike) -> str:
    """The summary's `kernels` cell: '' when no sampling job of the row logged a plain-torch fallback on
    a GPU, else 'plain-torch on cuda in <stage> (<what>); ...'."""
    found = []
    for stage in KERNEL_STAGES:
        log = log_file(results, stage, stage_key(row, stage))
        if log.is_file():
            what = plain_torch_kernels(log.read_text(encoding="utf-8", errors="replace"))
            if what:
                found.append(f"{stage} ({what})")
    return f"plain-torch on cuda in {'; '.join(found)}" if found else ""


def row_summary(results: str | Path, row: RowLike) -> dict[str, object]:
    """One line of summary.csv: the row's overall state, its first failure, and per-stage columns."""
    stages = {stage: stage_status(results, row, stage) for stage in STAGES}
    failed = [s for s in STAGES if stages[s].state == FAILED]
    if all(st.state == DONE for st in stages.values()):
        state = DONE
    elif failed:
        state = FAILED
    else:
        state = MISSING
    times = [st.seconds for st in stages.values() if st.seconds is not None]
    line: dict[str, object] = {
        "id": row.id,
        "state": state,
        "failed_stage": failed[0] if failed else "",
        "error": stages[failed[0]].error if failed else "",
        "total_s": round(sum(times), 2) if times else "",
        "video": stages["encode_video"].output,
        "kernels": row_kernels(results, row),
        "prompt_tokens": prompt_tokens(results, row),
        "prompt_key": row.prompt_key,
        "prompt": row.prompt,
        # the sheet's own cells (RowRef, read back from summary.csv, has none of them)
        "image": getattr(row, "image", ""),
        "last_image": getattr(row, "last_image", None) or "",
        "chain": getattr(row, "chain", None) or "",
        "loras": format_loras(getattr(row, "loras", ())),
    }
    for stage in STAGES:
        st = stages[stage]
        line[f"{stage}_state"] = st.state
        line[f"{stage}_s"] = round(st.seconds, 2) if st.seconds is not None else ""
        line[f"{stage}_output"] = st.output
    return line


def prompt_tokens(results: str | Path, row: RowLike) -> object:
    """How many tokens the row's prompt made (umT5 reads 512), from its embedding's record; "" before."""
    from ..files.artifacts import ArtifactError, read_record

    path = stage_output(results, row, "encode_prompt")
    try:
        return read_record(path).get("params", {}).get("prompt_tokens", "") if path.is_file() else ""
    except ArtifactError:
        return ""


def columns() -> list[str]:
    head = ["id", "state", "failed_stage", "error", "total_s", "video"]
    per_stage = [f"{stage}_{what}" for what in ("state", "s") for stage in STAGES]
    outputs = [f"{stage}_output" for stage in STAGES]
    return head + per_stage + outputs + ["kernels", "prompt_tokens", "prompt_key", "prompt", "image", "last_image",
                                         "chain", "loras"]


def build_summary(results: str | Path, rows: Iterable[RowLike]) -> list[dict[str, object]]:
    return [row_summary(results, row) for row in rows]


# Cells of free text (and paths, which hold ids and folder names) that a spreadsheet could take for a
# formula; the numbers, states and stage names are the pipeline's own.
TEXT_COLUMNS = frozenset({"id", "error", "video", "prompt", "image", "last_image", "chain", "loras",
                          *(f"{stage}_output" for stage in STAGES)})
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: object) -> object:
    """A text cell as summary.csv stores it: one quote before text a spreadsheet would run as a formula
    (OWASP's advice against CSV injection), and before text that starts with a quote itself, so that
    reading it back (csv_untext) is never ambiguous."""
    if isinstance(value, str) and value.startswith((*_FORMULA_START, "'")):
        return "'" + value
    return value


def csv_untext(value: str) -> str:
    """The text csv_text stored."""
    return value[1:] if value.startswith("'") else value


def write_summary(results: str | Path, rows: Iterable[RowLike]) -> Path:
    """Rebuild <results>/summary.csv (atomically) and return its path."""
    path = Path(results) / SUMMARY_NAME
    lines = build_summary(results, rows)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns())
            writer.writeheader()
            writer.writerows({k: csv_text(v) if k in TEXT_COLUMNS else v for k, v in line.items()} for line in lines)
    return path


def read_summary(results: str | Path) -> list[dict[str, str]]:
    """summary.csv's lines, text cells as they were before write_summary guarded them."""
    path = Path(results) / SUMMARY_NAME
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: csv_untext(v) if k in TEXT_COLUMNS and isinstance(v, str) else v for k, v in rec.items()}
                for rec in csv.DictReader(f)]


def rows_from_summary(results: str | Path) -> list[RowRef]:
    """The rows a previous summary listed, to rebuild it without the sheet."""
    return [RowRef(rec["id"], rec["prompt"], rec["prompt_key"]) for rec in read_summary(results)]


def format_table(lines: list[dict[str, object]]) -> str:
    """A terminal table: one line per row, a short state code per stage, the total time, the error."""
    codes = {DONE: "ok", FAILED: "FAIL", MISSING: "-"}
    head = ["id", "state", *(s.replace("encode_", "enc_") for s in STAGES), "time_s", "error"]
    body = [
        [str(line["id"]), str(line["state"]), *(codes.get(str(line[f"{s}_state"]), "?") for s in STAGES),
         str(line["total_s"]), str(line["error"])]
        for line in lines
    ]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head) - 1)]
    out = []
    for r in [head, *body]:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
    counts = {state: sum(1 for line in lines if line["state"] == state) for state in (DONE, FAILED, MISSING)}
    out.append(f"{len(lines)} rows: {counts[DONE]} done, {counts[FAILED]} failed, {counts[MISSING]} incomplete")
    return "\n".join(line.rstrip() for line in out)
