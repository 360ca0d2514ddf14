"""The demo sheet through `--profile profiles/slurm` on a real one-node SLURM cluster.

tools/slurm-local.sh starts munged, slurmctld and slurmd here (two fake GPUs, proctrack/cgroup as on
real clusters) for the test session and stops them at its end. It needs root; CI (.ci/run) is root
and sets TURBOWAN_REQUIRE_SLURM=1, so there a missing cluster fails the suite instead of skipping.

The profile groups a model stage's rows into one SLURM job with one GPU, runs them in the job's
batch step (so the worker the first row starts serves the others), and keeps the rows a cancelled
group had finished (keep-incomplete).
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

MODEL_RULES = ("encode_prompt", "encode_image", "sample_high", "sample_low", "decode")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster; yields the environment its commands need."""
    if os.geteuid() != 0:
        if os.environ.get("TURBOWAN_REQUIRE_SLURM") == "1":
            pytest.fail("TURBOWAN_REQUIRE_SLURM=1 but not root: cannot start the one-node SLURM")
        pytest.skip("starting the one-node SLURM (tools/slurm-local.sh) needs root")
    state = tmp_path_factory.mktemp("slurm") / "cluster"  # (made by the script: root's, 0700)
    script = [str(REPO / "tools" / "slurm-local.sh")]
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state)}
    subprocess.run([*script, "start"], env=env, check=True, timeout=900)
    try:
        yield {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run([*script, "stop"], env=env, timeout=120)


def slurm_jobs(cluster_env) -> list[dict]:
    """Every job SLURM still remembers (MinJobAge): id, the rule(s) in its comment, state, what it asked."""
    out = subprocess.run(
        ["squeue", "-t", "all", "-h", "-O", "JobID:|,Comment:|,State:|,tres-per-job:|,tres-per-node:"],
        env={**os.environ, **cluster_env}, capture_output=True, text=True, check=True,
    ).stdout
    jobs = []
    for line in out.splitlines():
        job_id, comment, state, per_job, per_node = (field.strip() for field in line.split("|"))
        rules = [rule for rule in (*MODEL_RULES, "encode_video", "batch_contact_sheet", "gallery") if rule in comment]
        jobs.append({"id": int(job_id), "comment": comment, "rules": rules, "state": state,
                     "tres": per_job + per_node})
    return jobs


def write_batch(workdir: Path, models: dict) -> list[str]:
    """The demo sheet (its images and prompts) at 48x32, 9 frames; the config pointing at it."""
    demo = REPO / "config" / "demo"
    with open(demo / "sheet.csv", newline="", encoding="utf-8") as f:
        # (the demo_models have no LoRA; chained rows' SLURM groups are checked in test_chains)
        rows = [row for row in csv.DictReader(f) if not row.get("loras") and not row["image"].startswith("@")]
    for row in rows:
        for column in ("loras", "last_image", "chain"):
            row.pop(column, None)
        row.update(image=str(demo / row["image"]), num_frames="9", width="48", height="32")
    with open(workdir / "sheet.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(sheet=str(workdir / "sheet.csv"), results=str(workdir / "results"), models=dict(models))
    config.pop("loras", None)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return [row["id"] for row in rows]


def our_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "turbowan.runtime.worker" in line]


def test_rows_of_a_stage_share_a_slurm_job_and_a_cancel_loses_no_finished_row(tmp_path, demo_models, slurm_cluster):
    ids = write_batch(tmp_path, demo_models)
    last = ids[-1]
    results = tmp_path / "results"
    profile = ["--profile", str(REPO / "profiles" / "slurm"), "--configfile", str(tmp_path / "config.yaml"),
               # The plugin polls SLURM this long after a submission, then 10 s, 20 s, ... later.
               "--slurm-init-seconds-before-status-checks", "3"]
    seen_before = {job["id"] for job in slurm_jobs(slurm_cluster)}

    # Run 1: the last row's low-noise steps hang (a stuck GPU); once the rows before it in its group
    # are done, the group's SLURM job is cancelled. No retries: they would resubmit it at once.
    hang = {**slurm_cluster, "TURBOWAN_INJECT_FAULT": f"sample_low:{last}:hang"}
    cmd, env = snakemake_command(tmp_path, *profile, "--retries", "0", local=False, extra_env=hang)
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = results / "logs" / "sample_low"
    cancelled = None
    deadline = time.monotonic() + 600
    while cancelled is None and time.monotonic() < deadline and first.poll() is None:
        done = [i for i in ids[:-1] if (logs / f"{i}.log").is_file() and "sample_low done in" in (logs / f"{i}.log").read_text()]
        hanging = (logs / f"{last}.log").is_file() and f"sample_low of {last}" in (logs / f"{last}.log").read_text()
        running = [j for j in slurm_jobs(slurm_cluster) if j["id"] not in seen_before and j["state"] == "RUNNING"
                   and j["rules"] == ["sample_low"]]
        if len(done) == len(ids) - 1 and hanging and running:
            cancelled = running[0]
            subprocess.run(["scancel", str(cancelled["id"])], env={**os.environ, **slurm_cluster}, check=True)
        time.sleep(0.3)
    log1 = first.communicate(timeout=600)[0]
    assert cancelled is not None, f"the sample_low group was not seen with its last row hanging:\n{log1[-3000:]}"
    assert first.returncode != 0 and "CANCELLED" in log1, log1[-3000:]
    for row in ids[:-1]:  # finished in the cancelled job, and kept
        assert (results / row / "latent.safetensors").is_file(), log1[-3000:]
    assert not (results / last / "latent.safetensors").exists()

    run1 = [j for j in slurm_jobs(slurm_cluster) if j["id"] not in seen_before]
    # ... and one model load served each group: the worker the first row started served the others.
    for rule, what in (("encode_image", "loading VAE"), ("sample_high", "loading expert"), ("sample_low", "loading expert")):
        texts = [(results / "logs" / rule / f"{i}.log").read_text() for i in ids]
        assert sum(text.count(what) for text in texts) == 1, (rule, [t.count(what) for t in texts])
        workers = {m for text in texts for m in re.findall(r"in worker pid (\d+)", text)}
        assert len(workers) == 1, (rule, workers)

    # Run 2, the profile as a user runs it: the cut-off row only; nothing finished is made again.
    before = file_ids(tmp_path)
    run_snakemake(tmp_path, *profile, local=False, extra_env=slurm_cluster)
    after = file_ids(tmp_path)
    assert {path: after[path] for path in before} == before
    for row in ids:
        assert (results / row / "video.mp4").stat().st_size > 0
    run2 = [j for j in slurm_jobs(slurm_cluster) if j["id"] not in seen_before and j not in run1
            and j["id"] > max(job["id"] for job in run1)]
    assert not [j for j in run2 if set(j["rules"]) & {"encode_prompt", "encode_image", "sample_high"}], run2

    # One SLURM job per model stage and run, the rows grouped (a group starts once all its rows can:
    # decode ran only in run 2, sample_low in both), each asking for one GPU; none for the CPU jobs.
    jobs = run1 + run2
    counts = {rule: len([j for j in jobs if j["rules"] == [rule]]) for rule in MODEL_RULES}
    assert counts == {"encode_prompt": 1, "encode_image": 1, "sample_high": 1, "sample_low": 2, "decode": 1}, jobs
    for job in jobs:
        gpu = bool(set(job["rules"]) & set(MODEL_RULES))
        assert ("gpu:1" in job["tres"]) == gpu and "gpu:2" not in job["tres"], job

    # Nothing of ours outlives the SLURM jobs (proctrack/cgroup ends a job's processes with it).
    deadline = time.monotonic() + 60
    while our_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not our_processes()
