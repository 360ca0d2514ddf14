"""The demo sheet through `--profile profiles/slurm` on a real one-node SLURM cluster.

tools/slurm-local.sh starts munged, slurmctld and slurmd here (two fake GPUs) for the test
session and stops them at its end. It needs root; CI (.ci/run) is root and sets
TURBOWAN_REQUIRE_SLURM=1, so there a missing cluster fails the suite instead of skipping.

GPU stages run one SLURM job per group of `batch_rows` rows (rule `<stage>_<group>`, no wildcards;
group "<first>~<last>", or the row id for a group of one); encode_video is one job per row.
"""

import csv
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, file_ids, run_snakemake, snakemake_command

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

GPU_RULES = {"encode_prompt", "encode_image", "sample_high", "sample_low", "decode"}
CPU_RULES = {"encode_video", "previews", "batch_contact_sheet", "gallery"}  # the mp4 and the report
BATCH_ROWS = 2  # the demo's 3 rows: groups harbour~portrait-1 and cafe.night, which can run side by side


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster; yields the environment its commands need."""
    if os.geteuid() != 0:
        if os.environ.get("TURBOWAN_REQUIRE_SLURM") == "1":
            pytest.fail("TURBOWAN_REQUIRE_SLURM=1 but not root: cannot start the one-node SLURM")
        pytest.skip("starting the one-node SLURM (tools/slurm-local.sh) needs root")
    state = tmp_path_factory.mktemp("slurm")
    script = [str(REPO / "tools" / "slurm-local.sh")]
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state)}
    subprocess.run([*script, "start"], env=env, check=True, timeout=900)
    try:
        yield {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run([*script, "stop"], env=env, timeout=120)


def slurm_jobs(cluster_env) -> list[dict]:
    """Every job SLURM still remembers (MinJobAge): id, rule, key, state, GPUs asked for, times.

    rule is the stage for a group job ("sample_low" for `sample_low_<group>`) and key its group;
    for a per-row job (encode_video, previews) key is the row; "" for the batch's jobs."""
    out = subprocess.run(
        ["squeue", "-t", "all", "-h", "-O", "JobID:|,Comment:|,State:|,tres-per-job:|,StartTime:|,EndTime:"],
        env={**os.environ, **cluster_env}, capture_output=True, text=True, check=True,
    ).stdout
    jobs = []
    for line in out.splitlines():
        job_id, comment, state, tres, start, end = (field.strip() for field in line.split("|"))
        rule, _, key = comment.removeprefix("rule_").partition("_wildcards_")
        stage = next((stage for stage in GPU_RULES if rule.startswith(f"{stage}_")), None)
        if stage:
            rule, key = stage, rule.removeprefix(f"{stage}_")
        jobs.append({"id": int(job_id), "rule": rule, "key": key, "state": state, "tres": tres,
                     "start": start, "end": end})
    return jobs


def write_batch(workdir: Path, models: dict) -> dict:
    """The demo sheet (its images and prompts) at 48x32, 9 frames; the config pointing at it."""
    demo = REPO / "config" / "demo"
    with open(demo / "sheet.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.update(image=str(demo / row["image"]), num_frames="9", width="48", height="32")
    with open(workdir / "sheet.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(sheet=str(workdir / "sheet.csv"), results=str(workdir / "results"), models=dict(models),
                  batch_rows=BATCH_ROWS)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return {row["id"]: row for row in rows}


def row_groups(ids: list[str]) -> dict[str, list[str]]:
    """{group: its rows}, as rules/common.smk groups the sheet's rows."""
    chunks = [ids[i:i + BATCH_ROWS] for i in range(0, len(ids), BATCH_ROWS)]
    return {(c[0] if len(c) == 1 else f"{c[0]}~{c[-1]}"): c for c in chunks}


def test_demo_sheet_on_slurm_resumes_after_a_cancelled_sampling_job(tmp_path, demo_models, slurm_cluster):
    rows = write_batch(tmp_path, demo_models)
    groups = row_groups(list(rows))
    assert len(groups) == 2
    results = tmp_path / "results"
    profile = ["--profile", str(REPO / "profiles" / "slurm"), "--configfile", str(tmp_path / "config.yaml"),
               # The plugin polls SLURM this long after a submission (and after a poll that found
               # a job done), then 10 s, 20 s, ... later each time it finds none: polls at 3, 16,
               # 39 s. A test job takes 7-9 s on an idle 2-core machine: found at 16 s.
               "--slurm-init-seconds-before-status-checks", "3"]
    seen_before = {job["id"] for job in slurm_jobs(slurm_cluster)}

    # Run 1, without the profile's retries (they would resubmit the cancelled job at once):
    # cancel the first low-noise sampling job (a group) seen running; keep-going finishes the other
    # group's rows.
    cmd, env = snakemake_command(tmp_path, *profile, "--retries", "0", local=False, extra_env=slurm_cluster)
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cancelled = None
    deadline = time.monotonic() + 600
    while cancelled is None and time.monotonic() < deadline and first.poll() is None:
        running = [j for j in slurm_jobs(slurm_cluster) if j["id"] not in seen_before
                   and j["state"] == "RUNNING" and j["rule"] == "sample_low"]
        if running:
            cancelled = running[0]
            subprocess.run(["scancel", str(cancelled["id"])], env={**os.environ, **slurm_cluster}, check=True)
        time.sleep(0.3)
    log1 = first.communicate(timeout=900)[0]
    assert cancelled is not None, f"no sample_low job was seen running:\n{log1[-3000:]}"
    assert first.returncode != 0, log1[-3000:]
    assert "CANCELLED" in log1
    group = cancelled["key"]
    assert group in groups, cancelled
    for row in groups[group]:
        assert not (results / row / "latent.safetensors").exists()  # the cancelled job's outputs
        assert (results / row / "boundary.safetensors").exists()  # what the row had finished stays
    for other in set(rows) - set(groups[group]):
        assert (results / other / "video.mp4").stat().st_size > 0, log1[-3000:]
    # Rows the cancelled job had finished before it was killed are in the store (the rest: none).
    finished = [row for row in groups[group] if (log := results / "logs" / "sample_low" / f"{row}.log").is_file()
                and f"row {row}: sample_low done in " in log.read_text()]

    run1_jobs = [j for j in slurm_jobs(slurm_cluster) if j["id"] not in seen_before]
    before = file_ids(tmp_path)  # which file each artifact and video is

    # Run 2, the profile as a user runs it: finishes the batch, recomputes nothing finished.
    run_snakemake(tmp_path, *profile, local=False, extra_env=slurm_cluster)
    for row_id in rows:
        assert (results / row_id / "video.mp4").stat().st_size > 0
    after = file_ids(tmp_path)
    assert {path: after[path] for path in before} == before  # nothing finished was made again
    run2_jobs = [j for j in slurm_jobs(slurm_cluster) if j["id"] > max(job["id"] for job in run1_jobs)]
    redone = [("sample_low", group), ("decode", group)]  # the cancelled group's jobs ...
    redone += [(rule, row) for rule in ("encode_video", "previews") for row in groups[group]]  # ... its rows'
    redone += [("batch_contact_sheet", ""), ("gallery", "")]  # they gather every row's files
    assert sorted((j["rule"], j["key"]) for j in run2_jobs) == sorted(redone)
    for row in groups[group]:  # the rerun group job computed only the rows the cancelled one had not
        text = (results / "logs" / "sample_low" / f"{row}.log").read_text()
        if row in finished:
            assert f"row {row} (" in text and "sample_low reused from the store" in text, text
        else:
            assert f"row {row}: sample_low done in " in text, text

    # What each job asked SLURM for: one GPU for the GPU rules, none for the mp4 and the report.
    all_jobs = run1_jobs + run2_jobs
    assert {j["rule"] for j in all_jobs} == GPU_RULES | CPU_RULES
    for job in all_jobs:
        wants_gpu = job["rule"] in GPU_RULES
        assert ("gpu:1" in job["tres"]) == wants_gpu, job
    # ... and the jobs took the card SLURM gave them (turbowan.runtime.gpus takes no lock under SLURM).
    # GPU jobs ran side by side on the two cards: nothing (say, a `resources: gpu=1` in
    # profiles/default, which Snakemake loads beside this profile) held them to one at a time.
    # (SLURM's times have whole seconds, ISO format: strings compare as times.)
    gpu_jobs = [j for j in slurm_jobs(slurm_cluster) if j["id"] in {job["id"] for job in all_jobs}
                and j["rule"] in GPU_RULES and j["state"] == "COMPLETED"]
    overlapping = [(a, b) for i, a in enumerate(gpu_jobs) for b in gpu_jobs[i + 1:]
                   if a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping, f"no two GPU jobs ran at once: {gpu_jobs}"
    cards = {}  # SLURM job id -> CUDA_VISIBLE_DEVICES, from the group jobs' logs (last run of each job)
    for rule in GPU_RULES:
        benchmarks = (results / "benchmarks" / rule).glob("*.tsv")
        job_logs = [results / "logs" / rule / f"{bench.stem}.log" for bench in benchmarks]
        assert len(job_logs) == 2, job_logs  # a job's benchmark and log share its group's name
        for log in job_logs:
            found = re.search(r"gpu: assigned by SLURM job (\d+); CUDA_VISIBLE_DEVICES=(\S+)", log.read_text())
            assert found, log
            cards[int(found.group(1))] = found.group(2)
    checked = [(a, b) for a, b in overlapping if a["id"] in cards and b["id"] in cards]
    assert checked
    for a, b in checked:
        assert cards[a["id"]] != cards[b["id"]], f"jobs {a} and {b} ran at once on one card"
    assert "gpu: not requested" in (results / "logs" / "encode_video" / f"{groups[group][0]}.log").read_text()
