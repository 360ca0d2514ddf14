"""Fault injection: killed runs, corrupt artifacts, failing rows, full disks, bad configs."""

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from snakemake.utils import validate

from turbowan import stages
from turbowan.artifacts import load_artifact
from turbowan.sheet import SheetError, check_defaults

from .conftest import BIN, REPO, make_workdir, mtimes, snakemake, write_image

pytestmark = pytest.mark.slow

THREE_ROWS = (
    "id,image,prompt,seed,num_frames,width,height\n"
    "r1,images/harbour.png,one,1,5,32,32\n"
    "r2,images/portrait.jpg,two,2,5,32,32\n"
    "r3,images/cafe.png,three,3,5,32,32\n"
)


def finished_files(folder: Path) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of every finished artifact and video."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in (folder / "results").rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".mp4")
    }


def test_sigkill_during_sampling_then_resume(tmp_path):
    folder = make_workdir(tmp_path, THREE_ROWS)
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(folder), "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8"}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(folder), "--cores", "1",
           "--resources", "gpu=1", "--configfile", str(folder / "config.yaml")]
    # its own process group: killing it kills Snakemake and its running job, like a dead node
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    seen_low = 0
    deadline = time.monotonic() + 600
    for line in proc.stderr:
        if "rule sample_low:" in line:
            seen_low += 1
            if seen_low == 2:  # one row's low stage has finished, the next one just started
                os.killpg(proc.pid, signal.SIGKILL)
                break
        assert time.monotonic() < deadline
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = finished_files(folder)
    assert any(k.endswith("latent.safetensors") for k in before)
    from turbowan.artifacts import quick_check

    assert all(quick_check(folder / name) is None for name in before if name.endswith(".safetensors"))

    # the documented resume: unlock, then rerun what was incomplete
    snakemake(folder, "--unlock")
    snakemake(folder, "--rerun-incomplete")
    after = finished_files(folder)
    for name, (mtime, data) in before.items():
        assert after[name] == (mtime, data), f"{name} was recomputed or changed"
    for row in ("r1", "r2", "r3"):
        assert (folder / "results" / row / "video.mp4").is_file()


def test_truncated_boundary_is_detected_and_only_its_row_recomputed(batch):
    folder = batch  # the session's finished 2-row batch, copied
    before = mtimes(folder)
    boundary = folder / "results" / "face" / "boundary.safetensors"
    data = boundary.read_bytes()
    boundary.write_bytes(data[: len(data) - 100])
    os.utime(boundary, ns=(before["results/face/boundary.safetensors"],) * 2)  # same mtime: Snakemake can't tell
    out = snakemake(folder)
    assert "face/boundary.safetensors is" in out.stderr and "will remake it" in out.stderr
    after = mtimes(folder)
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == {"results/face/boundary.safetensors", "results/face/latent.safetensors",
                       "results/face/video.mp4"}
    assert (folder / "results" / "face" / "boundary.safetensors.broken").is_file()


def test_corrupt_bytes_inside_an_artifact_are_caught_by_its_reader(tmp_path, demo_models):
    text = tmp_path / "text.safetensors"
    stages.encode_prompt("a cat", demo_models["text_encoder"], demo_models["tokenizer"], str(text), "cpu")
    data = bytearray(text.read_bytes())
    data[-7] ^= 0xFF  # flip bits inside the tensor data; the header stays valid
    text.write_bytes(bytes(data))
    with pytest.raises(Exception, match="corrupt .*moved it to text.safetensors.broken"):
        load_artifact(text, "encode_prompt", {"text": (None, torch.bfloat16)})
    assert not text.exists() and (tmp_path / "text.safetensors.broken").exists()


def test_one_failing_row_does_not_stop_the_others(tmp_path):
    folder = make_workdir(tmp_path, THREE_ROWS)
    env_fault = {"TURBOWAN_INJECT_FAULT": "sample_low:r2"}
    out = snakemake(folder, "--keep-going", check=False, extra_env=env_fault)
    assert out.returncode != 0
    assert "fault injected" in (folder / "results" / "logs" / "sample_low" / "r2.log").read_text()
    assert (folder / "results" / "r1" / "video.mp4").is_file() and (folder / "results" / "r3" / "video.mp4").is_file()
    assert not (folder / "results" / "r2" / "latent.safetensors").exists()
    import csv

    with open(folder / "results" / "summary.csv", newline="", encoding="utf-8") as f:
        summary = {line["id"]: line for line in csv.DictReader(f)}
    assert summary["r2"]["state"] == "failed" and summary["r2"]["failed_stage"] == "sample_low"
    assert "fault injected" in summary["r2"]["error"]
    assert summary["r1"]["state"] == summary["r3"]["state"] == "done"
    before = mtimes(folder)
    snakemake(folder)  # the fault is gone: only r2's remaining stages run
    after = mtimes(folder)
    assert {k for k in before if after[k] != before[k]} == set()
    assert set(after) - set(before) == {"results/r2/latent.safetensors", "results/r2/video.mp4"}


def test_disk_full_while_writing_leaves_nothing_and_rerun_completes(tmp_path, demo_models, monkeypatch):
    import turbowan.artifacts as artifacts

    write_image(tmp_path / "a.png", 40, 30)
    video = {"width": 32, "height": 32, "num_frames": 5}
    out = tmp_path / "row" / "cond.safetensors"

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # some bytes made it to disk, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        stages.encode_image(str(tmp_path / "a.png"), demo_models["vae"], str(out), video, "cpu")
    assert list((tmp_path / "row").iterdir()) == []
    monkeypatch.undo()
    stages.encode_image(str(tmp_path / "a.png"), demo_models["vae"], str(out), video, "cpu")
    load_artifact(out, "encode_image", {"y": ((1, 20, 2, 4, 4), torch.bfloat16)}, params=video)


def test_disk_full_while_writing_frames_leaves_no_frames_folder(tmp_path, monkeypatch):
    from PIL import Image

    from turbowan.video import save_frames

    calls = []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        Path(fp).write_bytes(b"png")

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(OSError):
        save_frames(torch.zeros(5, 16, 16, 3, dtype=torch.uint8), tmp_path / "frames", {})
    assert list(tmp_path.iterdir()) == []


CONFIG_SCHEMA = REPO / "config" / "schemas" / "config.schema.yaml"
BASE = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"boundry": 0.9}, "'boundry' was unexpected"),
        ({"defaults": {**BASE["defaults"], "num_steps": 5}}, "5 is greater than the maximum of 4"),
        ({"defaults": {**BASE["defaults"], "num_steps": "four"}}, "'four' is not of type 'integer'"),
        ({"defaults": {**BASE["defaults"], "boundary": 1.0}}, "1.0 is greater than or equal to the maximum of 1"),
        ({"defaults": {**BASE["defaults"], "boundary": 0}}, "0 is less than or equal to the minimum of 0"),
        ({"defaults": {**BASE["defaults"], "width": 100, "height": 64}}, "100 is not a multiple of 16"),
        ({"defaults": {**BASE["defaults"], "width": 4096, "height": 64}}, "4096 is greater than the maximum of 2048"),
        ({"defaults": {**BASE["defaults"], "resolution": "1080p"}}, "'1080p' is not one of"),
        ({"video": {"fps": 0, "quality": 5}}, "0 is less than the minimum of 1"),
        ({"device": "tpu"}, "'tpu' does not match"),
        ({"models": {k: v for k, v in BASE["models"].items() if k != "vae"}}, "'vae' is a required property"),
    ],
)
def test_bad_config_values_are_refused(change, message):
    with pytest.raises(Exception, match=message):
        validate({**BASE, **change}, str(CONFIG_SCHEMA))


def test_frames_default_not_4k_plus_1_is_refused():
    with pytest.raises(SheetError, match="defaults.num_frames: 48 is not 4k\\+1"):
        check_defaults({**BASE["defaults"], "num_frames": 48})


@pytest.mark.parametrize(
    "config_change, sheet, message",
    [
        ({"defaults": {**BASE["defaults"], "num_frames": 48}}, None, "defaults.num_frames: 48 is not 4k+1"),
        ({"defaults": {**BASE["defaults"], "num_stepz": 2}}, None, "'num_stepz' was unexpected"),
        ({"models": {**BASE["models"], "high": "nowhere/high.pth"}}, None, "models.high: nowhere/high.pth does not exist"),
        ({}, "id,image,prompt\nx y,images/cafe.png,p\n", "row 1 (id 'x y'), column 'id'"),
        ({}, "id,image,prompt,num_steps\nx,images/cafe.png,p,9\n", "row 1 (id 'x'), column 'num_steps': 9 must be <= 4"),
    ],
)
def test_bad_input_stops_snakemake_before_any_job(tmp_path, config_change, sheet, message):
    folder = make_workdir(tmp_path, sheet or THREE_ROWS)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config.update(config_change)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(folder, check=False)
    assert out.returncode != 0 and message in out.stdout + out.stderr, out.stderr[-3000:]
    assert not (folder / "results").exists() and not (folder / "resources").exists()
