"""A local run with `--resources gpu=2` on a box with two (fake) cards: concurrent GPU jobs (one per
row and stage) take different cards, each card's worker serves its jobs, and a row's artifacts do
not depend on the card; afterwards, what reruns when a value changes (profiles/default's triggers)."""

import re
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, run_snakemake

pytestmark = pytest.mark.slow

CARDS = ["GPU-0a0a0a0a-0000-0000-0000-000000000000", "GPU-1b1b1b1b-1111-1111-1111-111111111111"]
GPU_RULES = ("encode_prompt", "encode_image", "sample_high", "sample_low", "decode")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def job_span(log: Path):
    """(start, end, uuid of the locked card, worker pid) of one job, from its log."""
    text = log.read_text()
    times = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in map(STAMP.match, text.splitlines()) if m]
    card = re.search(r"gpu: card \d+ .*uuid=(GPU-[0-9a-f-]+), locked via ", text)
    worker = re.search(r" in worker pid (\d+)", text)
    assert card and worker, f"{log}: no card or worker line in\n{text}"
    return times[0], times[-1], card.group(1), int(worker.group(1))


def test_concurrent_gpu_jobs_use_different_cards_and_params_trigger_reruns(tmp_path, demo_models):
    sheet = tmp_path / "sheet.csv"
    image = REPO / "config" / "demo" / "images"
    sheet.write_text(
        "id,image,prompt,num_frames,width,height\n"
        f"a,{image / 'harbour.png'},a boat,9,48,32\n"
        f"b,{image / 'cafe.png'},a cafe at night,9,48,32\n"
        f"c,{image / 'portrait.jpg'},a face,9,48,32\n"
        f"d,{image / 'harbour.png'},a gull,9,32,48\n"  # (not a's size: no two rows share a result)
    )
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(sheet=str(sheet), results=str(tmp_path / "results"), models=dict(demo_models))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {"TURBOWAN_GPUS": ",".join(CARDS), "TURBOWAN_GPU_LOCK_DIR": str(tmp_path / "locks")}

    run_snakemake(tmp_path, "--configfile", str(tmp_path / "config.yaml"), "--cores", "2", "--resources", "gpu=2",
                  extra_env=env)

    logs = tmp_path / "results" / "logs"
    job_logs = [log for rule in GPU_RULES for log in (logs / rule).glob("*.log")]
    assert len(job_logs) == 4 * 4 + 4  # one job per row and GPU stage, one per prompt
    spans = [job_span(log) for log in job_logs]
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, "no two GPU jobs ran at once; the test did not test anything"
    for a, b in overlapping:
        assert a[2] != b[2], f"two jobs at once on card {a[2]}"
    assert {span[2] for span in spans} == set(CARDS)
    # one worker per card, and each served only its card's jobs
    workers = {}
    for _, _, card, pid in spans:
        workers.setdefault(card, set()).add(pid)
    assert all(len(pids) == 1 for pids in workers.values()) and len(set.union(*workers.values())) == 2, workers

    # Nothing changed: nothing to do. A changed value reruns the jobs that get it, and only those.
    dry = run_snakemake(tmp_path, "--configfile", str(tmp_path / "config.yaml"), "-n", extra_env=env)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    config["video"]["quality"] = 9
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = run_snakemake(tmp_path, "--configfile", str(tmp_path / "config.yaml"), "-n", extra_env=env).stdout
    jobs = dict(re.findall(r"^(\S+)\s+(\d+)$", dry.split("Job stats:")[1], re.M))
    # decode too: the frames are temporary; then the report made from the videos
    assert jobs == {"all": "1", "decode": "4", "encode_video": "4", "batch_contact_sheet": "1", "gallery": "1",
                    "total": "11"}
