"""The workflow on user files: .pth checkpoints go through prepare_models and give the same video as
the safetensors demo; wrong files stop the run at parse time; downloads fail clearly offline."""

import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import prompt_sheet, run_snakemake, write_image
from turbowan.files.artifacts import load_artifact, read_record
from turbowan.files.convert import write_safetensors
from turbowan.demo import write_official_pth
from turbowan.stages.conditioning import encode_image
from turbowan.stages.context import StageContext
from turbowan.stages.decoding import decode
from turbowan.stages.prompt import encode_prompt
from turbowan.stages.sampling import sample_high, sample_low
from turbowan.stages.video import encode_video
from turbowan.wan.sizes import latent_shape

VIDEO = {"width": 48, "height": 32, "num_frames": 9}
SAMPLING = {"seed": 7, "num_steps": 4, "sigma_max": 200.0, "boundary": 0.9, "ode": False}
PROMPT = "a small boat in the harbour at night"


def write_config(workdir: Path, models: dict, **extra) -> Path:
    image = write_image(workdir / "in.png", 60, 40, seed=2)
    sheet = workdir / "sheet.csv"
    sheet.write_text(f"id,image,prompt\nboat,{image},{PROMPT}\n")
    config = {
        "sheet": str(sheet), "results": str(workdir / "results"), "device": "cpu", "models": models,
        "prepared_models": str(workdir / "prepared"),
        "defaults": {**VIDEO, **SAMPLING, "sigma_max": 200},
        **extra,
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def pth_models(demo_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pth")
    paths = {}
    for role, name in [("high", "TurboWan2.2-I2V-A14B-high-720P.pth"), ("low", "TurboWan2.2-I2V-A14B-low-720P.pth"),
                       ("vae", "Wan2.1_VAE.pth"), ("text_encoder", "models_t5_umt5-xxl-enc-bf16.pth")]:
        write_official_pth(demo_models[role], folder / name)
        paths[role] = str(folder / name)
    paths["tokenizer"] = demo_models["tokenizer"]
    return paths


def test_pth_models_are_prepared_once_and_give_the_safetensors_video(demo_models, pth_models, tmp_path):
    config = write_config(tmp_path, pth_models)
    run_snakemake(tmp_path, "--configfile", str(config))
    prepared = sorted(p.name for p in (tmp_path / "prepared").glob("*.safetensors"))
    assert prepared == ["TurboWan2.2-I2V-A14B-high-720P.safetensors", "TurboWan2.2-I2V-A14B-low-720P.safetensors",
                        "Wan2.1_VAE.safetensors", "models_t5_umt5-xxl-enc-bf16.safetensors"]
    high = load_file(tmp_path / "prepared" / prepared[0])
    assert high.keys() == load_file(demo_models["high"]).keys()  # net. / wrapper pieces removed
    assert read_record(tmp_path / "prepared" / prepared[0])["params"] == {"role": "high", "layout": "wan-dit"}
    boundary = read_record(tmp_path / "results" / "boat" / "boundary.safetensors")
    assert boundary["inputs"]["expert"]["path"].endswith("prepared/TurboWan2.2-I2V-A14B-high-720P.safetensors")
    assert boundary["params"]["attention"] == "auto"

    # the same row through the stages on the demo's safetensors files, in this process, on one
    # thread like the Snakemake job (CPU convolutions round differently with more threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = _reference_row(demo_models, tmp_path)
    finally:
        torch.set_num_threads(threads)

    def latent(path):
        return load_artifact(path, "sample_low", {"x": (latent_shape(**VIDEO), torch.float64)})[0]["x"]

    assert torch.equal(latent(tmp_path / "results" / "boat" / "latent.safetensors"), latent(ref / "l.safetensors"))
    assert (tmp_path / "results" / "boat" / "video.mp4").read_bytes() == (ref / "video.mp4").read_bytes()

    # cached: a second run converts nothing and runs nothing
    again = run_snakemake(tmp_path, "--configfile", str(config))
    assert "prepare_models" not in again.stdout + again.stderr
    assert "Nothing to be done" in again.stdout + again.stderr


def _reference_row(demo_models, tmp_path):
    """The row through the stage functions, one context for all of them (as a worker keeps one)."""
    ref = tmp_path / "reference"
    ref.mkdir()
    text, cond = str(ref / "text.safetensors"), str(ref / "cond.safetensors")
    image = str(tmp_path / "in.png")
    ctx = StageContext()
    encode_prompt(*prompt_sheet(ref, PROMPT), demo_models["text_encoder"], demo_models["tokenizer"], text, "cpu", ctx=ctx)
    encode_image(image, demo_models["vae"], cond, VIDEO, "cpu", ctx=ctx)
    sample_high(text, cond, demo_models["high"], str(ref / "b.safetensors"), SAMPLING, VIDEO, "cpu", ctx=ctx)
    sample_low(text, cond, str(ref / "b.safetensors"), demo_models["low"], str(ref / "l.safetensors"),
               SAMPLING, VIDEO, "cpu", ctx=ctx)
    decode(str(ref / "l.safetensors"), demo_models["vae"], str(ref / "frames"), VIDEO, "cpu", ctx=ctx)
    encode_video(str(ref / "frames"), str(ref / "video.mp4"), VIDEO, fps=16, quality=8)
    return ref


def test_wrong_model_file_stops_the_run_before_any_job(demo_models, tmp_path):
    clip = tmp_path / "clip_l.safetensors"
    write_safetensors({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 4)}, clip)
    models = {**{k: demo_models[k] for k in ("high", "low", "vae", "tokenizer")}, "text_encoder": str(clip)}
    proc = run_snakemake(tmp_path, "--configfile", str(write_config(tmp_path, models)), "-n", check=False)
    assert proc.returncode != 0
    assert f"models.text_encoder: {clip}: a CLIP model" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_download_offline_fails_at_once_listing_the_files(demo_models, tmp_path):
    models = {
        "high": str(tmp_path / "models" / "TurboWan2.2-I2V-A14B-high-720P.pth"),
        "low": str(tmp_path / "models" / "TurboWan2.2-I2V-A14B-low-720P.pth"),
        "vae": demo_models["vae"], "text_encoder": demo_models["text_encoder"],
        "tokenizer": str(tmp_path / "models" / "umt5-xxl"),
    }
    repo = "TurboDiffusion/TurboWan2.2-I2V-A14B-720P"
    commit = "0123456789abcdef0123456789abcdef01234567"  # every download names its revision
    download = {"high": {"repo": repo, "file": "TurboWan2.2-I2V-A14B-high-720P.pth", "revision": commit},
                "low": {"repo": repo, "file": "TurboWan2.2-I2V-A14B-low-720P.pth", "revision": commit},
                "tokenizer": {"repo": "Wan-AI/Wan2.1-T2V-1.3B", "folder": "google/umt5-xxl", "revision": "main"}}
    config = write_config(tmp_path, models, download=download)
    # ("--": --configfile takes every argument after it)
    proc = run_snakemake(tmp_path, "--configfile", str(config), "--", "download_models", check=False,
                         extra_env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0, proc.stdout
    log_dir = tmp_path / "results" / "logs" / "download_models"
    logs = "".join(p.read_text() for p in log_dir.glob("*.log"))
    assert "HF_HUB_OFFLINE is set" in logs, proc.stdout + proc.stderr
    assert {p.name for p in log_dir.glob("*.log")} <= {
        "high.log", "low.log", "tokenizer.log"}
    for role, url, dest in [
        ("high", f"https://huggingface.co/{repo}/resolve/{commit}/TurboWan2.2-I2V-A14B-high-720P.pth", models["high"]),
        ("low", f"https://huggingface.co/{repo}/resolve/{commit}/TurboWan2.2-I2V-A14B-low-720P.pth", models["low"]),
        ("tokenizer", "https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B/tree/main/google/umt5-xxl", models["tokenizer"]),
    ]:
        assert f"models.{role}: fetch {url}" in logs and f"put it at {dest}" in logs
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_download_that_cannot_connect_fails_with_the_same_list(tmp_path, monkeypatch):
    from turbowan.files.hub import DownloadError, HubFile, download

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    item = HubFile("vae", "Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1_VAE.pth", str(tmp_path / "m" / "Wan2.1_VAE.pth"))
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"(?s)cannot download model files .*127.0.0.1:9 is not reachable.*"
                       r"models.vae: fetch "
                       r"https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B/resolve/main/Wan2.1_VAE.pth"):
        download(item, [item])
    assert time.monotonic() - started < 10  # at once, not after the hub client's retries
    assert not (tmp_path / "m").exists() or list((tmp_path / "m").iterdir()) == []  # nothing left behind


def test_missing_official_file_names_its_source(demo_models, tmp_path):
    models = {**demo_models, "vae": str(tmp_path / "Wan2.1_VAE.pth")}
    proc = run_snakemake(tmp_path, "--configfile", str(write_config(tmp_path, models)), "-n", check=False)
    assert proc.returncode != 0
    assert (f"models.vae: {tmp_path}/Wan2.1_VAE.pth does not exist (fetch "
            "https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B/resolve/main/Wan2.1_VAE.pth") in proc.stdout + proc.stderr
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)
