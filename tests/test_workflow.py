"""End to end: Snakemake on a small sheet in a temporary folder, with the demo's tiny models.

One job per row and stage in static rules; model stages served by a resident worker per card."""

import os
import re
import signal
import subprocess
import time

import pytest
import torch
import yaml

from turbowan.files.video import probe

from .conftest import REPO, SHEET, alive, file_ids, jobs_run, make_workdir, snakemake, snakemake_command, snapshot

pytestmark = pytest.mark.slow

STATIC_RULES = {"all", "encode_prompt", "encode_image", "sample_high", "sample_low", "decode",
                "encode_video", "save_last_frame", "join_chain", "batch_contact_sheet", "gallery",
                "make_demo_models", "prepare_models", "download_models"}


def test_every_row_gets_its_video_from_one_job_per_row_and_stage(finished):
    results = finished / "results"
    assert probe(results / "boat" / "video.mp4") == {"frames": 9, "width": 48, "height": 32, "fps": 16.0}
    assert probe(results / "face" / "video.mp4") == {"frames": 5, "width": 32, "height": 48, "fps": 16.0}
    for row in ("boat", "face"):
        for name in ("cond", "boundary", "latent"):
            assert (results / row / f"{name}.safetensors").is_file()
        assert not (results / row / "frames").exists()  # temporary by default
        for rule in ("encode_image", "sample_high", "sample_low", "decode", "encode_video"):
            log = (results / "logs" / rule / f"{row}.log").read_text()
            assert f"{rule} done in" in log
            assert (results / "benchmarks" / rule / f"{row}.tsv").is_file()
            if rule != "encode_video":  # the model stages ran in the worker, which sent back the row's log
                assert f"{rule} of {row} in worker pid" in log
    assert len(list((results / "prompts").iterdir())) == 2
    assert not list(results.rglob("*.partial"))
    # under the usual umask 022 (the tests' own), nothing the batch wrote is writable by others
    open_to_others = [p for p in results.rglob("*") if p.lstat().st_mode & 0o022]
    assert not open_to_others, open_to_others
    # The worker kept its models: each expert was loaded for the first of the two rows only.
    for rule in ("sample_high", "sample_low"):
        loads = [(results / "logs" / rule / f"{row}.log").read_text().count("loading expert") for row in ("boat", "face")]
        assert sorted(loads) == [0, 1], (rule, loads)
    # ... and it ended with Snakemake: nothing of ours is left running.
    pids = {int(m) for log in (results / "logs").rglob("*.log")
            for m in re.findall(r"in worker pid (\d+)", log.read_text())}
    assert len(pids) == 1
    deadline = time.monotonic() + 30
    while alive(next(iter(pids))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(next(iter(pids)))


def test_rules_are_static_and_named_after_stages(finished):
    out = snakemake(finished, "--list-rules")
    assert set(out.stdout.split()) == STATIC_RULES


def test_second_run_does_nothing(batch):
    before = file_ids(batch)
    out = snakemake(batch)
    assert "Nothing to be done" in out.stdout + out.stderr
    assert file_ids(batch) == before


def test_commands_that_only_look_change_nothing_also_with_a_damaged_artifact(batch):
    boundary = batch / "results" / "face" / "boundary.safetensors"
    data, mtime = boundary.read_bytes(), boundary.stat().st_mtime_ns
    boundary.write_bytes(data[:-100])  # truncated, same mtime: Snakemake can't tell
    os.utime(boundary, ns=(mtime, mtime))
    before = snapshot(batch)
    for args in (["-n"], ["-S"], ["-D"], ["--list-changes", "params"], ["--list-changes", "input"], ["--dag"],
                 ["--report", str(batch / "report.zip")]):
        snakemake(batch, *args)
        assert snapshot(batch) == before, args
    assert (batch / "report.zip").is_file()


def test_forcing_sample_high_writes_new_boundaries_and_keeps_cond(batch):
    before = file_ids(batch)
    out = snakemake(batch, "-R", "sample_high")
    after = file_ids(batch)
    for row in ("boat", "face"):
        assert after[f"results/{row}/boundary.safetensors"] != before[f"results/{row}/boundary.safetensors"]
        assert after[f"results/{row}/cond.safetensors"] == before[f"results/{row}/cond.safetensors"]
    assert jobs_run(out.stdout + out.stderr).count("sample_high") == 2


def test_a_deleted_latent_and_video_remake_exactly_that_row(batch):
    before = file_ids(batch)
    for name in ("latent.safetensors", "video.mp4"):
        (batch / "results" / "face" / name).unlink()
    out = snakemake(batch)
    ran = jobs_run(out.stdout + out.stderr)
    assert [ran.count(rule) for rule in ("sample_low", "decode", "encode_video")] == [1, 1, 1], ran
    assert not {"sample_high", "encode_image", "encode_prompt"} & set(ran)
    after = file_ids(batch)
    assert {k for k in before if after.get(k) != before[k]} == {"results/face/latent.safetensors",
                                                                "results/face/video.mp4"}


@pytest.mark.parametrize("column, value", [("boundary", "0.95"), ("seed", "7")])
def test_changing_one_rows_value_reruns_only_its_sampling_and_after(batch, column, value):
    before = file_ids(batch)
    header, boat, face = (batch / "sheet.csv").read_text().splitlines()
    if column == "seed":
        face = face.replace(",2,5,32,48,3", f",{value},5,32,48,3")
    else:
        header, boat, face = header + f",{column}", boat + ",", face + f",{value}"
    (batch / "sheet.csv").write_text("\n".join([header, boat, face]) + "\n")
    snakemake(batch)
    after = file_ids(batch)
    changed = {k for k in before if after[k] != before[k]}
    assert changed == {"results/face/boundary.safetensors", "results/face/latent.safetensors",
                       "results/face/video.mp4"}


def test_changing_global_sigma_max_reruns_all_sampling_but_no_encoding(batch):
    config = yaml.safe_load((batch / "config.yaml").read_text())
    config["defaults"]["sigma_max"] = 80
    (batch / "config.yaml").write_text(yaml.safe_dump(config))
    before = file_ids(batch)
    snakemake(batch)
    after = file_ids(batch)
    changed = {k for k in before if after[k] != before[k]}
    assert changed == {f"results/{r}/{n}" for r in ("boat", "face")
                       for n in ("boundary.safetensors", "latent.safetensors", "video.mp4")}


def test_adding_a_row_computes_only_that_row(batch):
    before = file_ids(batch)
    sheet = (batch / "sheet.csv").read_text()
    (batch / "sheet.csv").write_text(sheet + "kite,images/cafe.png,a kite over the dunes,5,5,32,32,2\n")
    out = snakemake(batch)
    after = file_ids(batch)
    assert {k for k in before if after[k] != before[k]} == set()
    assert {"results/kite/latent.safetensors", "results/kite/video.mp4"} <= set(after) - set(before)
    assert jobs_run(out.stdout + out.stderr).count("sample_high") == 1


def test_bad_sheet_fails_before_any_job_and_creates_nothing(tmp_path):
    folder = make_workdir(tmp_path, SHEET + "boat,images/nope.png,,1,10,48,32,4\n")
    out = snakemake(folder, check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "id 'boat'), column 'id': duplicate id" in text
    assert "id 'boat'), column 'image'" in text and "column 'num_frames': 10 is not 4k+1" in text
    assert not (folder / "results").exists() and not (folder / "resources").exists()


def test_identical_prompts_share_one_text_embedding(tmp_path):
    folder = make_workdir(tmp_path, "id,image,prompt,num_frames,width,height\n"
                                    "a,images/cafe.png,same words,5,32,32\nb,images/harbour.png,same words,5,32,32\n")
    out = snakemake(folder, "--dry-run")
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", out.stdout.split("Job stats:")[1], re.M))
    assert stats["encode_prompt"] == "1" and stats["sample_high"] == "2"


def artifacts(results):
    from safetensors.torch import load_file

    return {str(p.relative_to(results)): load_file(p) for p in sorted(results.rglob("*.safetensors"))}


def assert_same_artifacts(ours: dict, theirs: dict, names) -> None:
    for name in names:
        assert ours[name].keys() == theirs[name].keys(), name
        for key in ours[name]:
            a, b = ours[name][key].contiguous(), theirs[name][key].contiguous()
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (name, key)


def test_a_rows_artifacts_are_the_same_from_a_busy_worker_a_fresh_one_and_no_worker(finished, tmp_path):
    """`finished`'s worker served boat before face. A run of face alone has a fresh worker; a run with
    worker: false makes every artifact in the job's own process. All three agree byte for byte."""
    served_first = artifacts(finished / "results")
    face_alone = make_workdir(tmp_path / "fresh", "\n".join(SHEET.splitlines()[::2]) + "\n")  # header + face
    snakemake(face_alone)
    fresh = artifacts(face_alone / "results")
    assert_same_artifacts(fresh, served_first, [n for n in fresh if n.startswith("face/") or n.startswith("prompts/")])
    assert len(fresh) == 4  # text, cond, boundary, latent
    assert "loading expert" in (face_alone / "results" / "logs" / "sample_high" / "face.log").read_text()

    no_worker = make_workdir(tmp_path / "own")
    config = yaml.safe_load((no_worker / "config.yaml").read_text())
    config["worker"] = False
    (no_worker / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(no_worker)
    own = artifacts(no_worker / "results")
    assert sorted(own) == sorted(served_first) and len(own) == 8
    assert_same_artifacts(own, served_first, own)
    log = (no_worker / "results" / "logs" / "sample_high" / "face.log").read_text()
    assert "in worker pid" not in log and "loading expert" in log


def test_a_second_snakemake_in_a_running_folder_changes_nothing(tmp_path):
    folder = make_workdir(tmp_path)
    cmd, env = snakemake_command(folder, "--configfile", str(folder / "config.yaml"))
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    locks = folder / ".snakemake" / "locks"
    deadline = time.monotonic() + 120
    while not (locks.is_dir() and any(locks.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert locks.is_dir() and any(locks.iterdir()), "the first run never took its lock"
    os.killpg(first.pid, signal.SIGSTOP)  # hold the first run where it is, lock taken
    try:
        before = snapshot(folder)
        second = snakemake(folder, check=False)
        assert second.returncode != 0
        assert "cannot be locked" in second.stdout + second.stderr
        assert snapshot(folder) == before
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out = first.communicate(timeout=600)[0]
    assert first.returncode == 0, out[-3000:]  # and the first run was not harmed
    assert (folder / "results" / "face" / "video.mp4").is_file()


def test_waves_deliver_videos_as_the_batch_goes(tmp_path):
    """12 rows in waves of 4, one job at a time: every job of a wave before the next wave, so the
    first mp4 comes once the first 4 rows have run sample_high, not after all 12."""
    rows = "\n".join(f"w{i:02d},images/cafe.png,prompt {i},5,16,16" for i in range(12))
    folder = make_workdir(tmp_path, "id,image,prompt,num_frames,width,height\n" + rows + "\n")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["wave_rows"] = 4
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(folder)
    ran = jobs_run(out.stdout + out.stderr)
    first_mp4 = ran.index("encode_video")
    assert ran[:first_mp4].count("sample_high") == 4
    assert ran[:first_mp4].count("sample_low") == 4
    # within a wave, one stage after another (one expert loaded per wave), rows in sheet order
    wave = ran[:first_mp4 + 4]
    assert wave.index("sample_low") > max(i for i, rule in enumerate(wave) if rule == "sample_high")
    order = re.findall(r"^(?:local)?rule sample_low:\n(?:    .*\n)*?    output: results/(w\d+)/", out.stdout + out.stderr, re.M)
    assert order == sorted(order) and len(order) == 12, order


def test_a_prompt_longer_than_umt5_reads_is_named_before_any_job(tmp_path, demo_models):
    long = " ".join(f"word{i}" for i in range(700))
    folder = make_workdir(tmp_path, f"id,image,prompt,num_frames,width,height\nshort,images/cafe.png,a cafe,5,32,32\n"
                                    f"long,images/harbour.png,{long},5,32,32\n")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["models"] = dict(demo_models)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(folder, "-n")
    warning = re.search(r"row 'long' \(line 3\): its prompt has (\d+) tokens; umT5 reads the first 512",
                        out.stdout + out.stderr)
    assert warning and int(warning[1]) > 700, (out.stdout + out.stderr)[-2000:]
    assert "row 'short'" not in out.stdout + out.stderr


def test_bad_chained_cells_fail_before_any_job_and_create_nothing(tmp_path):
    """A missing last_image, @unknown, a cycle and a LoRA scale that is no number, each named by row
    and column, all at once. (An unknown LoRA name is checked once the sheet reads: test_lora.)"""
    sheet = ("id,image,last_image,prompt,num_frames,width,height,loras,chain\n"
             "a,images/harbour.png,images/gone.png,one,5,32,32,,walk\n"
             "b,@nobody,,two,5,32,32,,walk\n"
             "c,@d,,three,5,32,32,,\n"
             "d,@c,,four,5,32,32,,\n"
             "f,images/harbour.png,,six,5,32,32,demo:lots,\n")
    out = snakemake(make_workdir(tmp_path, sheet), check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "id 'a'), column 'last_image': 'images/gone.png' does not exist" in text
    assert "id 'b'), column 'image': '@nobody' names no row of the sheet" in text
    assert "id 'd'), column 'image': '@c' closes a cycle of rows" in text and "c -> d -> c" in text
    assert "id 'f'), column 'loras'" in text and "is not a number" in text
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()
