"""End to end: Snakemake on a small sheet in a temporary folder, with the demo's tiny models."""

import re

import pytest
import torch
import yaml

from turbowan.files.video import probe

from .conftest import SHEET, alive, make_workdir, file_ids, snakemake

pytestmark = pytest.mark.slow


def test_every_row_gets_its_video(finished):
    results = finished / "results"
    assert probe(results / "boat" / "video.mp4") == {"frames": 9, "width": 48, "height": 32, "fps": 16.0}
    assert probe(results / "face" / "video.mp4") == {"frames": 5, "width": 32, "height": 48, "fps": 16.0}
    for row in ("boat", "face"):
        for name in ("cond", "boundary", "latent"):
            assert (results / row / f"{name}.safetensors").is_file()
        assert not (results / row / "frames").exists()  # temporary by default
        for rule in ("encode_image", "sample_high", "sample_low", "decode", "encode_video"):
            assert (results / "logs" / rule / f"{row}.log").stat().st_size > 0  # each row's own log
    # one job per stage served both rows (default batch_rows): its log and benchmark are the group's
    for rule in ("encode_image", "sample_high", "sample_low", "decode"):
        assert (results / "benchmarks" / rule / "boat~face.tsv").is_file()
        log = (results / "logs" / rule / "boat~face.log").read_text()
        assert "row boat (1/2)" in log and "row face (2/2)" in log
    assert (results / "benchmarks" / "encode_video" / "boat.tsv").is_file()
    # the decode job made boat's mp4 while it decoded face; face, its group's last row, got its own job's
    assert "made ahead" in (results / "logs" / "decode" / "boat~face.log").read_text()
    assert "encode_video reused from the store" in (results / "logs" / "encode_video" / "boat.log").read_text()
    assert "wrote" in (results / "logs" / "encode_video" / "face.log").read_text()
    # each artifact is the store's file, linked (one inode, no second copy)
    boundary = results / "boat" / "boundary.safetensors"
    assert boundary.stat().st_nlink == 2
    assert len(list((results / "prompts").iterdir())) == 2
    assert not list(results.rglob("*.partial"))
    # every model job ran in a worker of the run's fork server, which Snakemake's end stopped
    for rule in ("encode_image", "sample_high", "sample_low", "decode"):
        assert ", a worker of the fork server (pid " in (results / "logs" / rule / "boat~face.log").read_text()
    server_log = (results / "logs" / "fork_server.log").read_text()
    assert server_log.count("runs in worker") == 5 and "refused" not in server_log
    server_pid = int(re.search(r"serving \S+ \(pid (\d+)\)", server_log)[1])
    assert not alive(server_pid)


def test_model_jobs_that_import_their_own_make_the_same_artifacts(finished, tmp_path):
    """fork_server: false, every model job in its own process: bit for bit what the workers made."""
    from safetensors.torch import load_file

    folder = make_workdir(tmp_path)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["fork_server"] = False
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(folder)
    results = folder / "results"
    assert not (results / "logs" / "fork_server.log").exists()
    assert "(pid " in (log := (results / "logs" / "sample_high" / "boat~face.log").read_text())
    assert "own imports: no fork server" in log
    made = sorted(p.relative_to(results) for p in results.rglob("*.safetensors") if ".store" not in p.parts)
    assert made == sorted(p.relative_to(finished / "results") for p in (finished / "results").rglob("*.safetensors")
                          if ".store" not in p.parts)
    assert len(made) == 8  # 2 text embeddings; cond, boundary and latent of each row
    for name in made:
        ours, theirs = load_file(results / name), load_file(finished / "results" / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype
            assert torch.equal(ours[key].contiguous().view(torch.uint8), theirs[key].contiguous().view(torch.uint8)), (name, key)


def test_second_run_does_nothing(batch):
    before = file_ids(batch)
    out = snakemake(batch)
    assert "Nothing to be done" in out.stdout + out.stderr
    assert file_ids(batch) == before


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


def test_bad_sheet_fails_before_any_job_and_creates_nothing(tmp_path):
    folder = make_workdir(tmp_path, SHEET + "boat,images/nope.png,,1,10,48,32,4\n")
    out = snakemake(folder, check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "row 3 (id 'boat'), column 'id': duplicate id" in text
    assert "row 3 (id 'boat'), column 'image'" in text and "column 'num_frames': 10 is not 4k+1" in text
    assert not (folder / "results").exists() and not (folder / "resources").exists()


def test_identical_prompts_share_one_text_embedding(tmp_path):
    folder = make_workdir(tmp_path, "id,image,prompt,num_frames,width,height\n"
                                    "a,images/cafe.png,same words,5,32,32\nb,images/harbour.png,same words,5,32,32\n")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["batch_rows"] = 1
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(folder, "--dry-run")
    assert len(re.findall(r"^rule encode_prompt_\S+:", out.stdout, re.M)) == 1
    assert sorted(re.findall(r"^rule sample_high_\S+:", out.stdout, re.M)) == ["rule sample_high_a:", "rule sample_high_b:"]


def test_batch_rows_1_runs_one_job_per_row(tmp_path):
    folder = make_workdir(tmp_path)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["batch_rows"] = 1
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(folder, "--dry-run", "--until", *(f"sample_low_{r}" for r in ("boat", "face")))
    jobs = sorted(re.findall(r"^rule (\w+)_(boat|face):", out.stdout, re.M))
    assert jobs == sorted((stage, row) for stage in ("encode_image", "sample_high", "sample_low")
                          for row in ("boat", "face"))


def test_adding_a_row_computes_only_that_row(batch):
    before = file_ids(batch)
    sheet = (batch / "sheet.csv").read_text()
    (batch / "sheet.csv").write_text(sheet + "kite,images/cafe.png,a kite over the dunes,5,5,32,32,2\n")
    snakemake(batch)
    after = file_ids(batch)
    assert {k for k in before if after[k] != before[k]} == set()  # the group was rerun, its rows relinked
    assert {"results/kite/latent.safetensors", "results/kite/video.mp4"} <= set(after) - set(before)
    log = (batch / "results" / "logs" / "sample_high" / "boat~kite.log").read_text()
    assert "row boat (1/3): sample_high reused from the store" in log
    assert "row face (2/3): sample_high reused" in log and "row kite: sample_high done" in log
    assert log.count("load expert:") == 1  # loaded once, for the one row that needed it
