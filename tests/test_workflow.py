"""End to end: Snakemake on a small sheet in a temporary folder, with the demo's tiny models."""

import shutil
from pathlib import Path

import pytest
import yaml

from turbowan.video import probe

from .conftest import REPO, run_snakemake

pytestmark = pytest.mark.slow

SHEET = (
    "id,image,prompt,seed,num_frames,width,height,num_steps\n"
    'boat,images/harbour.png,"A boat, leaving ""the"" harbour",1,9,48,32,4\n'
    "face,images/portrait.jpg,Café — 夜,2,5,32,48,3\n"
)


def make_workdir(folder: Path, sheet: str = SHEET) -> Path:
    shutil.copytree(REPO / "config" / "demo" / "images", folder / "images")
    (folder / "sheet.csv").write_text(sheet, encoding="utf-8")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(sheet="sheet.csv", results="results")  # relative: copies of the folder stay self-contained
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def snakemake(folder: Path, *args, check=True, extra_env=None):
    return run_snakemake(folder, "--configfile", str(folder / "config.yaml"), *args, check=check, extra_env=extra_env)


def mtimes(folder: Path) -> dict[str, int]:
    """mtime of every stage artifact and video (not the pictures, summary and gallery made from them)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in (folder / "results").rglob("*") if p.is_file() and "logs" not in p.parts
            and "benchmarks" not in p.parts and "gallery" not in p.parts and p.suffix in (".safetensors", ".mp4")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-row batch run once; tests work on copies of it."""
    folder = make_workdir(tmp_path_factory.mktemp("batch"))
    snakemake(folder)
    return folder


@pytest.fixture
def batch(finished, tmp_path):
    copy = tmp_path / "batch"
    shutil.copytree(finished, copy, symlinks=True)
    return copy


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


def test_changing_one_rows_boundary_reruns_only_its_sampling_and_after(batch):
    before = mtimes(batch)
    sheet = (batch / "sheet.csv").read_text().replace("id,image,prompt,seed,num_frames,width,height,num_steps",
                                                      "id,image,prompt,seed,num_frames,width,height,num_steps,boundary")
    sheet = sheet.replace(",2,5,32,48,3\n", ",2,5,32,48,3,0.95\n")
    (batch / "sheet.csv").write_text(sheet)
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
