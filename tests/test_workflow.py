"""End to end: Snakemake on a small sheet in a temporary folder, with the demo's tiny models."""

import pytest
import yaml

from turbowan.video import probe

from .conftest import SHEET, make_workdir, mtimes, snakemake

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
            assert (results / "logs" / rule / f"{row}.log").stat().st_size > 0
            assert (results / "benchmarks" / rule / f"{row}.tsv").is_file()
    assert len(list((results / "prompts").iterdir())) == 2
    assert not list(results.rglob("*.partial"))


def test_second_run_does_nothing(batch):
    before = mtimes(batch)
    out = snakemake(batch)
    assert "Nothing to be done" in out.stdout + out.stderr
    assert mtimes(batch) == before


@pytest.mark.parametrize("column, value", [("boundary", "0.95"), ("seed", "7")])
def test_changing_one_rows_value_reruns_only_its_sampling_and_after(batch, column, value):
    before = mtimes(batch)
    header, boat, face = (batch / "sheet.csv").read_text().splitlines()
    if column == "seed":
        face = face.replace(",2,5,32,48,3", f",{value},5,32,48,3")
    else:
        header, boat, face = header + f",{column}", boat + ",", face + f",{value}"
    (batch / "sheet.csv").write_text("\n".join([header, boat, face]) + "\n")
    snakemake(batch)
    after = mtimes(batch)
    changed = {k for k in before if after[k] != before[k]}
    assert changed == {"results/face/boundary.safetensors", "results/face/latent.safetensors",
                       "results/face/video.mp4"}


def test_changing_global_sigma_max_reruns_all_sampling_but_no_encoding(batch):
    config = yaml.safe_load((batch / "config.yaml").read_text())
    config["defaults"]["sigma_max"] = 80
    (batch / "config.yaml").write_text(yaml.safe_dump(config))
    before = mtimes(batch)
    snakemake(batch)
    after = mtimes(batch)
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
    out = snakemake(folder, "--dry-run")
    assert out.stdout.count("rule encode_prompt:") == 1
    assert out.stdout.count("rule sample_high:") == 2
