"""The demo sheet through `--profile profiles/slurm` on a real one-node SLURM cluster.

tools/slurm-local.sh starts munged, slurmctld and slurmd here (two fake GPUs) for the test
session and stops them at its end. It needs root; CI (.ci/run) is root and sets
TURBOWAN_REQUIRE_SLURM=1, so there a missing cluster fails the suite instead of skipping.
"""

import csv
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, run_snakemake, snakemake_command

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

GPU_RULES = {"encode_prompt", "encode_image", "sample_high", "sample_low", "decode"}
CPU_RULES = {"encode_video", "previews", "batch_contact_sheet", "gallery"}  # the mp4 and the report
ARTIFACTS = ("text.safetensors", "cond.safetensors", "boundary.safetensors", "latent.safetensors", "video.mp4")


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
    """Every job SLURM still remembers (MinJobAge): id, rule, row, state, GPUs asked for, times."""
    out = subprocess.run(
        ["squeue", "-t", "all", "-h", "-O", "JobID:|,Comment:|,State:|,tres-per-job:|,StartTime:|,EndTime:"],
        env={**os.environ, **cluster_env}, capture_output=True, text=True, check=True,
    ).stdout
    jobs = []
    for line in out.splitlines():
        job_id, comment, state, tres, start, end = (field.strip() for field in line.split("|"))
        rule, _, row = comment.removeprefix("rule_").partition("_wildcards_")
        jobs.append({"id": int(job_id), "rule": rule, "row": row, "state": state, "tres": tres,
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
    config.update(sheet=str(workdir / "sheet.csv"), results=str(workdir / "results"), models=dict(models))
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return {row["id"]: row for row in rows}


def artifacts(results: Path) -> dict[str, int]:
    return {str(p.relative_to(results)): p.stat().st_mtime_ns
            for p in results.rglob("*") if p.name in ARTIFACTS}


def test_demo_sheet_on_slurm_resumes_after_a_cancelled_sampling_job(tmp_path, demo_models, slurm_cluster):
    rows = write_batch(tmp_path, demo_models)
    results = tmp_path / "results"
    profile = ["--profile", str(REPO / "profiles" / "slurm"), "--configfile", str(tmp_path / "config.yaml"),
               # The plugin polls SLURM this long after a submission, then 10 s, 20 s, ... later
               # again. A test job takes 15-25 s (three Python start-ups): 8 s finds most at 26 s.
               "--slurm-init-seconds-before-status-checks", "8"]
    seen_before = {job["id"] for job in slurm_jobs(slurm_cluster)}

    # Run 1, without the profile's retries (they would resubmit the cancelled job at once):
    # cancel the first low-noise sampling job seen running; keep-going finishes the other rows.
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
    row = cancelled["row"]
    assert not (results / row / "latent.safetensors").exists()  # the cancelled job's output
    assert (results / row / "boundary.safetensors").exists()  # what the row had finished stays
    for other in set(rows) - {row}:
        assert (results / other / "video.mp4").stat().st_size > 0, log1[-3000:]

    run1_jobs = [j for j in slurm_jobs(slurm_cluster) if j["id"] not in seen_before]
    before = artifacts(results)

    # Run 2, the profile as a user runs it: finishes the batch, recomputes nothing finished.
    run_snakemake(tmp_path, *profile, local=False, extra_env=slurm_cluster)
    for row_id in rows:
        assert (results / row_id / "video.mp4").stat().st_size > 0
    after = artifacts(results)
    assert {path: after[path] for path in before} == before
    run2_jobs = [j for j in slurm_jobs(slurm_cluster) if j["id"] > max(job["id"] for job in run1_jobs)]
    redone = [(rule, row) for rule in ("sample_low", "decode", "encode_video", "previews")]
    redone += [("batch_contact_sheet", ""), ("gallery", "")]  # they gather every row's files
    assert sorted((j["rule"], j["row"]) for j in run2_jobs) == sorted(redone)

    # What each job asked SLURM for: one GPU for the GPU rules, none for the mp4 and the report.
    all_jobs = run1_jobs + run2_jobs
    assert {j["rule"] for j in all_jobs} == GPU_RULES | CPU_RULES
    for job in all_jobs:
        wants_gpu = job["rule"] in GPU_RULES
        assert ("gpu:1" in job["tres"]) == wants_gpu, job
    # ... and the jobs took the card SLURM gave them (turbowan.gpus takes no lock under SLURM).
    # GPU jobs ran side by side on the two cards: nothing (say, a `resources: gpu=1` in
    # profiles/default, which Snakemake loads beside this profile) held them to one at a time.
    # (SLURM's times have whole seconds, ISO format: strings compare as times.)
    gpu_jobs = [j for j in slurm_jobs(slurm_cluster) if j["id"] in {job["id"] for job in all_jobs}
                and j["rule"] in GPU_RULES and j["state"] == "COMPLETED"]
    overlapping = [(a, b) for i, a in enumerate(gpu_jobs) for b in gpu_jobs[i + 1:]
                   if a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping, f"no two GPU jobs ran at once: {gpu_jobs}"
    cards = {}  # SLURM job id -> CUDA_VISIBLE_DEVICES, from the job logs (last run of each job)
    for rule in GPU_RULES:
        for log in (results / "logs" / rule).glob("*.log"):
            found = re.search(r"gpu: assigned by SLURM job (\d+); CUDA_VISIBLE_DEVICES=(\S+)", log.read_text())
            assert found, log
            cards[int(found.group(1))] = found.group(2)
    checked = [(a, b) for a, b in overlapping if a["id"] in cards and b["id"] in cards]
    assert checked
    for a, b in checked:
        assert cards[a["id"]] != cards[b["id"]], f"jobs {a} and {b} ran at once on one card"
    assert "gpu: not requested" in (results / "logs" / "encode_video" / f"{row}.log").read_text()
