"""summary.csv from a results folder: states, errors from real job logs, timings, the CSV itself."""

import csv
import logging

import pytest

from turbowan.files.artifacts import ArtifactError
from turbowan.runtime.jobs import run_cpu_job
from turbowan.report.summary import (
    STAGES, RowRef, benchmark_seconds, build_summary, columns, format_table, last_error, read_summary,
    rows_from_summary, stage_output, stage_status, write_summary,
)

ROW = RowRef(id="boat", prompt='A boat, "at dawn";\nthe camera pans', prompt_key="0123456789abcdef")


def finish(results, row, stage, seconds=None):
    """Leave what a successful job leaves: its output and (optionally) a benchmark."""
    out = stage_output(results, row, stage)
    if stage == "decode":
        out.mkdir(parents=True, exist_ok=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"x")
    if seconds is not None:
        key = row.prompt_key if stage == "encode_prompt" else row.id
        bench = results / "benchmarks" / stage / f"{key}.tsv"
        bench.parent.mkdir(parents=True, exist_ok=True)
        bench.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:01\t100.0\n")


def job_log(results, row, stage):
    return results / "logs" / stage / f"{row.prompt_key if stage == 'encode_prompt' else row.id}.log"


def fail(results, row, stage, error):
    """Run a stage that raises through run_cpu_job, which writes the job log Snakemake would keep."""

    def broken():
        raise error

    with pytest.raises(type(error)):
        run_cpu_job(stage, str(job_log(results, row, stage)), broken)


@pytest.fixture(autouse=True)
def restore_logging():
    """run_cpu_job points the root logger at the job's log file, as a job process wants; undo it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level


def test_done_failed_missing_from_real_logs(tmp_path):
    for stage in STAGES[:3]:
        finish(tmp_path, ROW, stage, seconds=1.25)
    fail(tmp_path, ROW, "sample_low", ArtifactError("results/boat/boundary.safetensors: broken safetensors file"))

    states = {stage: stage_status(tmp_path, ROW, stage) for stage in STAGES}
    assert [states[s].state for s in STAGES] == ["done", "done", "done", "failed", "missing", "missing"]
    assert states["encode_prompt"].seconds == 1.25
    assert states["encode_prompt"].output.endswith("prompts/0123456789abcdef/text.safetensors")
    failed = states["sample_low"]
    assert failed.error == "ArtifactError: results/boat/boundary.safetensors: broken safetensors file"
    assert failed.seconds is not None and failed.seconds < 5  # from "sample_low failed after 0.0 s"

    (line,) = build_summary(tmp_path, [ROW])
    assert line["state"] == "failed" and line["failed_stage"] == "sample_low"
    assert line["error"].startswith("ArtifactError: results/boat/boundary")
    assert line["total_s"] == pytest.approx(3.75, abs=0.1)
    assert line["encode_image_s"] == 1.25 and line["decode_s"] == ""


def test_rerun_that_succeeds_clears_the_failure(tmp_path):
    fail(tmp_path, ROW, "encode_image", RuntimeError("out of memory"))
    assert stage_status(tmp_path, ROW, "encode_image").state == "failed"
    run_cpu_job("encode_image", str(job_log(tmp_path, ROW, "encode_image")), lambda: None)
    finish(tmp_path, ROW, "encode_image")
    status = stage_status(tmp_path, ROW, "encode_image")
    assert status.state == "done" and status.error is None
    assert status.seconds is not None  # no benchmark: "done in X s" from the log


def test_decode_counts_as_done_once_its_temporary_frames_became_the_mp4(tmp_path):
    for stage in STAGES:
        finish(tmp_path, ROW, stage, seconds=2)
    stage_output(tmp_path, ROW, "decode").rmdir()  # Snakemake removes temp() frames after encode_video
    (line,) = build_summary(tmp_path, [ROW])
    assert line["state"] == "done" and line["decode_state"] == "done"
    assert line["total_s"] == 12
    stage_output(tmp_path, ROW, "encode_video").unlink()
    (line,) = build_summary(tmp_path, [ROW])
    assert line["state"] == "missing" and line["decode_state"] == "missing"


@pytest.mark.parametrize("log, expected", [
    ("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad value\n", "ValueError: bad value"),
    # chained: the last exception is the one reported
    ("KeyError: 'a'\n\nDuring handling of the above exception, another exception occurred:\n\n"
     "Traceback (most recent call last):\nturbowan.files.artifacts.ArtifactError: x.safetensors: missing\n",
     "ArtifactError: x.safetensors: missing"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n",
     "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    ("2026-11-25 INFO turbowan.job: sample_high done in 3.0 s\n", None),
    ("", None),
])
def test_last_error(log, expected):
    assert last_error(log) == expected


def test_last_error_is_kept_short():
    error = last_error("RuntimeError: " + "x" * 1000)
    assert error.startswith("RuntimeError: xxx") and error.endswith("…") and len(error) == 160


def test_benchmark_seconds_is_the_mean_over_repeats(tmp_path):
    bench = tmp_path / "b.tsv"
    bench.write_text("s\th:m:s\n2.0\t0:00:02\n4.0\t0:00:04\n")
    assert benchmark_seconds(bench) == 3.0
    assert benchmark_seconds(tmp_path / "none.tsv") is None


def test_write_and_read_back(tmp_path):
    other = RowRef(id="cafe.night", prompt="Café, «nuit» — 夜の雨", prompt_key="fedcba9876543210")
    for stage in STAGES:
        finish(tmp_path, ROW, stage, seconds=1)
    path = write_summary(tmp_path, [ROW, other])
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == columns()
        lines = list(reader)
    assert [line["id"] for line in lines] == ["boat", "cafe.night"]
    assert [line["state"] for line in lines] == ["done", "missing"]
    assert lines[1]["video"].endswith("cafe.night/video.mp4")
    assert rows_from_summary(tmp_path) == [ROW, other]  # prompts with quotes, newlines, Unicode survive
    assert not list(tmp_path.glob(".summary.csv*"))  # written atomically, no temporary file left


def test_format_table(tmp_path):
    fail(tmp_path, ROW, "encode_prompt", ValueError("tokenizer folder not found"))
    text = format_table(build_summary(tmp_path, [ROW]))
    head, body, total = text.splitlines()
    assert head.split()[:3] == ["id", "state", "enc_prompt"]
    assert body.split()[:4] == ["boat", "failed", "FAIL", "-"]
    assert body.endswith("ValueError: tokenizer folder not found")
    assert total == "1 rows: 0 done, 1 failed, 0 incomplete"


# --------------------------------------------------------------------------- text a spreadsheet would run


FORMULAS = ["=1+1", "+SUM(A1:A9)", "-2+3", "@cmd", "\t=1", "\r=1", "'quoted already", "''two", "plain", "",
            '=HYPERLINK("http://x","y")']


def test_formula_like_text_is_stored_as_text_and_read_back_as_written(tmp_path):
    """A prompt (or error, id, path) that a spreadsheet would evaluate is written with one leading quote
    (OWASP's advice against CSV injection); a leading quote of the text itself gets one too, so reading
    summary.csv back gives every text exactly as it was."""
    rows = [RowRef(id=f"r{i}", prompt=text, prompt_key=f"{i:016x}") for i, text in enumerate(FORMULAS)]
    rows.append(RowRef(id="-1-1", prompt="a boat", prompt_key="f" * 16))
    fail(tmp_path, rows[0], "encode_prompt", ValueError("=cmd|' /C calc'!A0"))
    for stage in STAGES:
        finish(tmp_path, rows[-1], stage, seconds=1)
    path = write_summary(tmp_path, rows)
    with open(path, newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    stored = {line["id"]: line for line in raw}
    assert stored["r0"]["prompt"] == "'=1+1"
    assert [line["prompt"] for line in raw[:len(FORMULAS)]] == [
        "'=1+1", "'+SUM(A1:A9)", "'-2+3", "'@cmd", "'\t=1", "'\r=1", "''quoted already", "'''two", "plain", "",
        '\'=HYPERLINK("http://x","y")']
    assert stored["r0"]["error"] == "ValueError: =cmd|' /C calc'!A0"  # (an error starts with its name)
    assert "'-1-1" in stored and stored["'-1-1"]["video"].endswith("-1-1/video.mp4")
    assert stored["'-1-1"]["total_s"] == "6.0" and stored["'-1-1"]["state"] == "done"  # numbers and states as they are
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for line in raw for cell in line.values())

    assert rows_from_summary(tmp_path) == rows  # every text back as written
    back = {line["id"]: line for line in read_summary(tmp_path)}
    assert back["r0"]["error"] == "ValueError: =cmd|' /C calc'!A0" and back["-1-1"]["total_s"] == "6.0"


# --------------------------------------------------------------------------- a GPU run on plain-torch kernels


FALLBACK = ("2026-11-25 10:00:01,000 WARNING turbowan.wan.models: kernels: plain-torch fallback on cuda "
            "(SLA attention: turbodiffusion.SLA not importable; int8 linears: turbodiffusion.ops not importable)\n")


def test_a_plain_torch_gpu_run_is_flagged_in_the_summary_and_the_gallery(tmp_path):
    from turbowan.report.gallery import BatchInfo, build_gallery
    from turbowan.report.summary import PLAIN_TORCH_WARNING, plain_torch_kernels
    from turbowan.sheet import Row

    def row(rid):
        return Row(id=rid, image=str(tmp_path / "gone.png"), prompt="a boat", seed=1, num_frames=9, width=48,
                   height=32, num_steps=4, sigma_max=200.0, boundary=0.9, ode=False)

    slow, fast = row("slow"), row("fast")
    for r in (slow, fast):
        for stage in STAGES:
            finish(tmp_path, r, stage, seconds=1)
    for stage, r, text in [("sample_high", slow, "INFO loading expert high.safetensors onto cuda\n" + FALLBACK),
                           ("sample_high", fast, "INFO loaded expert x: attention sla (turbodiffusion SLA (Triton))\n"),
                           ("sample_low", fast, "INFO sample_low done in 3.0 s\n")]:
        job_log(tmp_path, r, stage).parent.mkdir(parents=True, exist_ok=True)
        job_log(tmp_path, r, stage).write_text(text)

    assert plain_torch_kernels(FALLBACK).startswith("SLA attention: turbodiffusion.SLA not importable")
    assert plain_torch_kernels("INFO attention sla (plain torch SLA, topk 0.1)") is None  # on the CPU: as meant
    lines = {line["id"]: line for line in build_summary(tmp_path, [slow, fast])}
    assert lines["slow"]["kernels"] == ("plain-torch on cuda in sample_high (SLA attention: turbodiffusion.SLA not "
                                        "importable; int8 linears: turbodiffusion.ops not importable)")
    assert lines["fast"]["kernels"] == ""
    write_summary(tmp_path, [slow, fast])
    assert "kernels" in columns() and [line["kernels"] != "" for line in read_summary(tmp_path)] == [True, False]

    page = build_gallery(tmp_path / "gallery", [slow, fast], BatchInfo(results=str(tmp_path), fps=16)).read_text()
    top = page.index("id='kernels-warning'")
    assert top < page.index("<table id='summary'>")  # at the top, before the table
    assert f"{PLAIN_TORCH_WARNING}: 1 of 2 rows (slow)" in page
    assert PLAIN_TORCH_WARNING == "GPU run used plain-torch SLA/int8 kernels (turbodiffusion not installed): slower"
    row_part = page[page.index("id='row-slow'"):page.index("id='row-fast'")]
    assert f"<p class='warning kernels'>{PLAIN_TORCH_WARNING}: plain-torch on cuda in sample_high" in row_part
    assert "warning" not in page[page.index("id='row-fast'"):]


def test_the_sheets_image_chain_and_lora_cells_are_columns(tmp_path):
    from turbowan.sheet import Row

    common = dict(prompt="a boat", seed=1, num_frames=5, width=32, height=32, num_steps=2, sigma_max=80.0,
                  boundary=0.9, ode=False)
    rows = [Row(id="A", image="images/a.png", chain="trip", loras=(("motion", 0.8), ("style", 1.0)), **common),
            Row(id="B", image="@A", last_image="images/end.png", chain="trip", **common)]
    with open(write_summary(tmp_path, rows), newline="", encoding="utf-8") as f:
        raw = {line["id"]: line for line in csv.DictReader(f)}
    assert raw["A"]["loras"] == "motion:0.8;style:1" and raw["A"]["last_image"] == "" and raw["A"]["chain"] == "trip"
    assert raw["B"]["image"] == "'@A"  # a spreadsheet would take @A for a formula
    back = {line["id"]: line for line in read_summary(tmp_path)}
    assert back["B"]["image"] == "@A" and back["B"]["last_image"] == "images/end.png"
