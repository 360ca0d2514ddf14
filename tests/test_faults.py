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

from turbowan.stages.conditioning import encode_image
from turbowan.stages.prompt import encode_prompt
from turbowan.files.artifacts import load_artifact
from turbowan.settings import ConfigError, check_config
from turbowan.sheet import SheetError, check_defaults

from .conftest import BIN, REPO, file_ids, jobs_run, make_workdir, prompt_sheet, snakemake, write_image

pytestmark = pytest.mark.slow

THREE_ROWS = (
    "id,image,prompt,seed,num_frames,width,height\n"
    "r1,images/harbour.png,one,1,5,32,32\n"
    "r2,images/portrait.jpg,two,2,5,32,32\n"
    "r3,images/cafe.png,three,3,5,32,32\n"
)


def finished_files(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Which file (inode) and what bytes every finished artifact and video is."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.read_bytes())
        for p in (folder / "results").rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".mp4")
    }


def test_sigkill_of_a_run_loses_only_the_row_in_flight(tmp_path):
    folder = make_workdir(tmp_path, THREE_ROWS)
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(folder), "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8"}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(folder), "--cores", "1",
           "--resources", "gpu=1", "--configfile", str(folder / "config.yaml")]
    # r1's low steps are done (its wave's high steps first, then the low steps in sheet order), r2's
    # have just started: the job kills its process group (Snakemake's too, like a node that died)
    env["TURBOWAN_INJECT_FAULT"] = "sample_low:r2:kill"
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                          start_new_session=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert "sample_low of r2" in (folder / "results" / "logs" / "sample_low" / "r2.log").read_text()
    before = finished_files(folder)
    # the wave's high steps all ran before its first low step; r2's low steps were cut off
    assert {f"results/r{i}/boundary.safetensors" for i in (1, 2, 3)} <= set(before)
    assert "results/r2/latent.safetensors" not in before
    low_done = sum(f"results/r{i}/latent.safetensors" in before for i in (1, 3))
    from turbowan.files.artifacts import check_digest

    assert all(check_digest(folder / name) is None for name in before if name.endswith(".safetensors"))

    # the documented resume: unlock, then rerun what was incomplete
    snakemake(folder, "--unlock")
    out = snakemake(folder, "--rerun-incomplete")
    after = finished_files(folder)
    for name, (inode, data) in before.items():
        assert after[name] == (inode, data), f"{name} was recomputed or changed"
    ran = jobs_run(out.stdout + out.stderr)
    assert ran.count("sample_low") == 3 - low_done and "sample_high" not in ran
    for row in ("r1", "r2", "r3"):
        assert (folder / "results" / row / "video.mp4").is_file()


def test_a_reader_names_a_truncated_artifact_and_check_repair_remakes_its_row(batch):
    """Nothing moves files behind Snakemake's back: the job that reads a damaged artifact fails naming
    it; `turbowan check` finds it, `--repair` removes it and what was made from it; a rerun remakes
    exactly that, to the same bytes."""
    folder = batch
    boundary = folder / "results" / "face" / "boundary.safetensors"
    data, mtime = boundary.read_bytes(), boundary.stat().st_mtime_ns
    boundary.write_bytes(data[: len(data) - 100])
    os.utime(boundary, ns=(mtime, mtime))  # same mtime: Snakemake can't tell
    for name in ("latent.safetensors", "video.mp4"):  # so the reader of the boundary runs
        (folder / "results" / "face" / name).unlink()
    out = snakemake(folder, "--keep-going", check=False)
    assert out.returncode != 0
    assert "face/boundary.safetensors" in (folder / "results" / "logs" / "sample_low" / "face.log").read_text()
    config = ["--configfile", str(folder / "config.yaml")]
    check = subprocess.run([str(BIN / "turbowan"), "check", *config], cwd=folder, capture_output=True, text=True)
    assert check.returncode == 1 and "results/face/boundary.safetensors" in check.stdout, check.stdout + check.stderr
    assert boundary.exists()  # a check only looks
    before = file_ids(folder)
    repair = subprocess.run([str(BIN / "turbowan"), "check", "--repair", *config], cwd=folder, capture_output=True,
                            text=True)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert not boundary.exists() and "results/face/boundary.safetensors" in repair.stdout
    out = snakemake(folder)
    ran = jobs_run(out.stdout + out.stderr)
    assert ran.count("sample_high") == 1 and "encode_image" not in ran
    assert boundary.read_bytes() == data
    after = file_ids(folder)
    assert all(after[k] == before[k] for k in before if k.startswith("results/boat/"))


def test_corrupt_bytes_inside_an_artifact_are_caught_by_its_reader(tmp_path, demo_models):
    text = tmp_path / "text.safetensors"
    encode_prompt(*prompt_sheet(tmp_path, "a cat"), demo_models["text_encoder"], demo_models["tokenizer"], str(text), "cpu")
    data = bytearray(text.read_bytes())
    data[-7] ^= 0xFF  # flip bits inside the tensor data; the header stays valid
    text.write_bytes(bytes(data))
    with pytest.raises(Exception, match="text.safetensors: corrupt .*turbowan check --repair"):
        load_artifact(text, "encode_prompt", {"text": (None, torch.bfloat16)})
    assert text.exists()  # a reader never moves files: `turbowan check --repair` does, when asked


def test_a_failing_row_fails_its_job_and_the_others_finish(tmp_path):
    folder = make_workdir(tmp_path, THREE_ROWS)
    out = snakemake(folder, "--keep-going", check=False, extra_env={"TURBOWAN_INJECT_FAULT": "sample_high:r2"})
    assert out.returncode != 0 and "Error in rule sample_high" in out.stdout + out.stderr
    results = folder / "results"
    assert "fault injected" in (results / "logs" / "sample_high" / "r2.log").read_text()
    assert (results / "r1" / "video.mp4").is_file() and (results / "r3" / "video.mp4").is_file()
    for name in ("boundary.safetensors", "latent.safetensors", "frames", "video.mp4"):
        assert not (results / "r2" / name).exists()  # a failed job: no file at its artifact paths
    import csv

    with open(results / "summary.csv", newline="", encoding="utf-8") as f:
        summary = {line["id"]: line for line in csv.DictReader(f)}
    assert summary["r2"]["state"] == "failed" and summary["r2"]["failed_stage"] == "sample_high"
    assert "fault injected" in summary["r2"]["error"]
    assert summary["r1"]["state"] == summary["r3"]["state"] == "done"
    before = file_ids(folder)
    out = snakemake(folder)  # the fault is gone: only r2 is computed
    after = file_ids(folder)
    assert {k for k in before if after[k] != before[k]} == set()
    assert set(after) - set(before) == {f"results/r2/{n}" for n in ("boundary.safetensors", "latent.safetensors",
                                                                    "video.mp4")}


def test_disk_full_while_writing_leaves_nothing_and_rerun_completes(tmp_path, demo_models, monkeypatch):
    import safetensors.torch

    write_image(tmp_path / "a.png", 40, 30)
    video = {"width": 32, "height": 32, "num_frames": 5}
    out = tmp_path / "row" / "cond.safetensors"

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # some bytes made it to disk, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)  # what save_artifact calls
    with pytest.raises(OSError, match="No space left"):
        encode_image(str(tmp_path / "a.png"), demo_models["vae"], str(out), video, "cpu")
    assert list((tmp_path / "row").iterdir()) == []
    monkeypatch.undo()
    encode_image(str(tmp_path / "a.png"), demo_models["vae"], str(out), video, "cpu")
    load_artifact(out, "encode_image", {"y": ((1, 20, 2, 4, 4), torch.bfloat16)}, params=video)


def test_disk_full_while_writing_frames_leaves_no_frames_folder(tmp_path, monkeypatch):
    from PIL import Image

    from turbowan.files.video import save_frames

    calls = []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        if isinstance(fp, (str, Path)):
            Path(fp).write_bytes(b"png")
        else:
            fp.write(b"png")

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(OSError):
        save_frames(torch.zeros(5, 16, 16, 3, dtype=torch.uint8), tmp_path / "frames", {})
    assert list(tmp_path.iterdir()) == []


CONFIG_SCHEMA = REPO / "config" / "schemas" / "config.schema.yaml"
BASE = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"boundry": 0.9}, "boundry: unknown key (did you mean 'defaults.boundary'?)"),
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
    with pytest.raises(ConfigError) as caught:
        check_config({**BASE, **change}, CONFIG_SCHEMA)
    assert message in str(caught.value) and len(str(caught.value)) < 400  # a line, not the schema


def test_every_config_problem_is_reported_at_once():
    bad = {**BASE, "boundry": 0.9, "device": "tpu", "defaults": {**BASE["defaults"], "num_steps": 5, "num_frames": 48}}
    with pytest.raises(ConfigError) as caught:
        check_config(bad, CONFIG_SCHEMA)
    assert len(caught.value.problems) == 4
    assert "config: 4 problem(s)" in str(caught.value) and "sheet" not in str(caught.value)


def test_frames_default_not_4k_plus_1_is_refused():
    with pytest.raises(SheetError, match="defaults.num_frames: 48 is not 4k\\+1"):
        check_defaults({**BASE["defaults"], "num_frames": 48})


@pytest.mark.parametrize(
    "config_change, sheet, message",
    [
        ({"defaults": {**BASE["defaults"], "num_frames": 48}}, None, "defaults.num_frames: 48 is not 4k+1"),
        ({"defaults": {**BASE["defaults"], "num_stepz": 2}}, None, "defaults.num_stepz: unknown key (did you mean 'num_steps'?)"),
        ({"models": {**BASE["models"], "high": "nowhere/high.pth"}}, None, "models.high: nowhere/high.pth does not exist"),
        ({}, "id,image,prompt\nx y,images/cafe.png,p\n", "row 1 (line 2, id 'x y'), column 'id'"),
        ({}, "id,image,prompt,num_steps\nx,images/cafe.png,p,9\n", "row 1 (line 2, id 'x'), column 'num_steps': 9 must be <= 4"),
        ({}, "id,image,prompt\n..,images/cafe.png,p\n", "row 1 (line 2, id '..'), column 'id'"),
        ({}, "id,image,prompt\n.store,images/cafe.png,p\n", "row 1 (line 2, id '.store'), column 'id'"),
        ({}, "id,image,prompt\ngallery,images/cafe.png,p\n", "row 1 (line 2, id 'gallery'), column 'id'"),
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
