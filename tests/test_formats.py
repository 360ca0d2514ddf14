"""Model files told apart by content, every layout of the same weights giving the same network, and a
clear error (naming the file) for each kind of wrong file; results written durably and checked (frames,
videos); model downloads pinned to a commit and resumable."""

import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.model_layouts import write_layouts
from turbowan.files.convert import prepare_model
from turbowan.files.formats import CheckpointError, check_model_set, inspect_model, inspect_role
from turbowan.wan.int8 import BlockInt8Linear
from turbowan.wan.models import load_text_encoder, load_transformer, load_vae

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def layouts(demo_models, tmp_path_factory):
    return write_layouts(demo_models, tmp_path_factory.mktemp("layouts"))


@pytest.mark.parametrize("name, kind, layout, container", [
    ("dit.safetensors", "dit", "wan-dit", "safetensors"),
    ("dit.pth", "dit", "wan-dit", "pth"),
    ("dit-int8.pth", "dit", "wan-dit-int8", "pth"),
    ("t5.pth", "text_encoder", "umt5-official", "pth"),
    ("t5-hf.safetensors", "text_encoder", "umt5-hf", "safetensors"),
    ("t5-fp8.safetensors", "text_encoder", "umt5-hf-fp8-scaled", "safetensors"),
    ("vae.pth", "vae", "wan2.1-vae", "pth"),
])
def test_each_layout_is_recognised_by_content(layouts, tmp_path, name, kind, layout, container):
    # renamed to say nothing: detection must not look at the file name
    anonymous = tmp_path / "model.bin"
    anonymous.write_bytes(open(layouts[name], "rb").read())
    info = inspect_model(anonymous)
    assert (info.kind, info.layout, info.container) == (kind, layout, container)
    if kind == "dit":
        assert info.sla and info.config["num_layers"] == 2 and info.config["in_channels"] == 36
        assert len(info.int8_layers) == (20 if "int8" in name else 0)  # 10 linears per block


def _dit_forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 36, 2, 4, 6, generator=g).to(torch.bfloat16)
    text = torch.randn(1, 512, 32, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([900.0], dtype=torch.bfloat16),
                     encoder_hidden_states=text, return_dict=False)[0].float()


def test_expert_layouts_bit_equal(layouts, tmp_path):
    reference = load_transformer(layouts["dit.safetensors"], CPU)
    prepared = tmp_path / "prepared.safetensors"
    prepare_model(layouts["dit.pth"], str(prepared), "high")
    assert not any(k.startswith("net.") or "_checkpoint_wrapped_module" in k for k in load_file(prepared))
    out = _dit_forward(reference)
    for path in (layouts["dit.pth"], prepared):
        model = load_transformer(path, CPU)
        state, ref_state = model.state_dict(), reference.state_dict()
        assert state.keys() == ref_state.keys()
        assert all(torch.equal(state[k], ref_state[k]) and state[k].dtype == ref_state[k].dtype for k in state)
        assert torch.equal(_dit_forward(model), out)
    # SLA weights are loaded (float32, as the official module keeps them) and used
    proj = reference.blocks[1].attn1.sla.proj_l.weight
    official = load_file(layouts["dit.safetensors"])["blocks.1.self_attn.attn_op.local_attn.proj_l.weight"]
    assert proj.dtype == torch.float32 and torch.equal(proj, official.float())


def test_int8_expert_runs_on_cpu_close_to_bf16(layouts, tmp_path):
    bf16 = load_transformer(layouts["dit.safetensors"], CPU)
    prepared = tmp_path / "int8.safetensors"
    prepare_model(layouts["dit-int8.pth"], str(prepared), "low")
    assert load_file(prepared)["blocks.0.ffn.0.int8_weight"].dtype == torch.int8
    int8 = load_transformer(prepared, CPU)
    linear = int8.blocks[0].attn2.to_k
    assert isinstance(linear, BlockInt8Linear) and linear.int8_weight.dtype == torch.int8
    assert linear.scale.dtype == torch.float32 and tuple(linear.scale.shape) == (2, 2)  # [256, 256]: 2 x 2 blocks
    assert isinstance(int8.proj_out, torch.nn.Linear)  # outside `blocks` nothing is quantised
    ref, out = _dit_forward(bf16), _dit_forward(int8)
    rel = ((out - ref).norm() / ref.norm()).item()
    # int8 weights (128x128 blocks, amax/128 steps) vs bf16 weights: 1-2% through 2 blocks
    assert 0 < rel < 0.03, rel
    assert torch.equal(_dit_forward(load_transformer(layouts["dit-int8.pth"], CPU)), out)


def _encode(model):
    ids = torch.tensor([[5, 17, 42, 8, 1, 0, 0]])
    mask = (ids > 0).long()
    mask[0, 4] = 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state.float()


def test_text_encoder_layouts(layouts):
    ref = _encode(load_text_encoder(layouts["t5.safetensors"], CPU))
    for name in ("t5.pth", "t5-hf.safetensors"):
        assert torch.equal(_encode(load_text_encoder(layouts[name], CPU)), ref), name
    fp8_model = load_text_encoder(layouts["t5-fp8.safetensors"], CPU, dtype=torch.float32)
    official = load_file(layouts["t5.safetensors"])
    w = official["blocks.1.ffn.fc1.weight"].float()
    w8 = fp8_model.encoder.block[1].layer[1].DenseReluDense.wi_1.weight
    scale = w.abs().amax() / 448
    # e4m3 keeps 3 mantissa bits: rounding error <= 2^-4 relative (+ half a subnormal step near 0)
    assert ((w8 - w).abs() <= w.abs() * 2**-4 + scale * 2**-10).all()
    assert not torch.equal(w8, w)
    out = _encode(fp8_model)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05, rel


def test_vae_pth_and_safetensors_equal(layouts):
    a = load_vae(layouts["vae.pth"], CPU).state_dict()
    b = load_vae(layouts["vae.safetensors"], CPU).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- wrong files


def _variant(layouts, tmp_path, name, edit):
    tensors = load_file(layouts[name])
    edit(tensors)
    path = tmp_path / f"variant-{name}"
    save_file(tensors, str(path))
    return path


def test_clip_text_encoder_is_refused(tmp_path):
    path = tmp_path / "text_encoder.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(49408, 8),
               "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)}, str(path))
    with pytest.raises(CheckpointError, match=rf"{path}: a CLIP model .*umT5-XXL"):
        inspect_role(path, "text_encoder")


def test_wan21_i2v_dit_with_clip_inputs_is_refused(layouts, tmp_path):
    path = _variant(layouts, tmp_path, "dit.safetensors",
                    lambda t: t.update({"img_emb.proj.1.weight": torch.zeros(256, 1280)}))
    with pytest.raises(CheckpointError, match=rf"{path}: a Wan2.1 I2V DiT with CLIP image inputs"):
        inspect_role(path, "high")


@pytest.mark.parametrize("name", ["dit.safetensors", "dit.pth"])
def test_truncated_files_are_refused(layouts, tmp_path, name):
    data = open(layouts[name], "rb").read()
    path = tmp_path / f"truncated-{name}"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match=rf"{path}: .*truncated or damaged"):
        inspect_model(path)


@pytest.mark.parametrize("channels, hint", [(16, "text-to-video model"), (48, "TI2V-5B")])
def test_expert_of_another_model_is_refused(layouts, tmp_path, channels, hint):
    def edit(t):
        t["patch_embedding.weight"] = torch.zeros(256, channels * 4, dtype=torch.bfloat16)
        t["head.head.weight"] = torch.zeros(channels * 4, 256, dtype=torch.bfloat16)
        t["head.head.bias"] = torch.zeros(channels * 4, dtype=torch.bfloat16)

    path = _variant(layouts, tmp_path, "dit.safetensors", edit)
    with pytest.raises(CheckpointError, match=rf"{path}: a DiT with {channels} input.*{hint}.*take 36"):
        inspect_role(path, "low")


def test_missing_block_tensor_is_refused(layouts, tmp_path):
    path = _variant(layouts, tmp_path, "dit.safetensors", lambda t: t.pop("blocks.1.cross_attn.k.weight"))
    with pytest.raises(CheckpointError, match=rf"{path}: incomplete DiT: block 1 differs from block 0"):
        inspect_model(path)


def test_plain_t5_is_not_umt5(layouts, tmp_path):
    path = _variant(layouts, tmp_path, "t5-hf.safetensors",
                    lambda t: t.pop("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"))
    with pytest.raises(CheckpointError, match=rf"{path}: a T5 encoder .*not umT5"):
        inspect_model(path)


def test_file_in_the_wrong_role_is_refused(layouts):
    with pytest.raises(CheckpointError, match=r"is the Wan2.1 VAE .* models.high must be a Wan2.2 I2V DiT expert"):
        inspect_role(layouts["vae.pth"], "high")


def test_mismatched_set_is_reported(layouts, tmp_path):
    def widen(t):  # an expert for a 64-wide text encoder, and with 3 layers
        t["text_embedding.0.weight"] = torch.zeros(256, 64, dtype=torch.bfloat16)
        for k in [k for k in t if k.startswith("blocks.1.")]:
            t[k.replace("blocks.1.", "blocks.2.")] = t[k].clone()

    other = inspect_model(_variant(layouts, tmp_path, "dit.safetensors", widen))
    infos = {"high": inspect_model(layouts["dit.safetensors"]), "low": other,
             "text_encoder": inspect_model(layouts["t5.pth"]), "vae": inspect_model(layouts["vae.pth"])}
    problems = check_model_set(infos)
    assert any("experts of different sizes" in p and "num_layers 2 vs 3" in p and "text_dim 32 vs 64" in p
               for p in problems), problems
    assert any(p.startswith("models.text_encoder") and "expects text_dim 64" in p and str(other.path) in p
               for p in problems), problems
    assert len(problems) == 2


def test_the_snakefile_checks_safetensors_model_files_without_torch(layouts):
    """Snakemake checks every model file before a job starts, in every `snakemake` call (and on SLURM
    in every job's): with safetensors files that takes no torch import (1.5 s). Also int8 and fp8."""
    import subprocess
    import sys

    files = {name: layouts[name] for name in ("dit.safetensors", "dit-int8.safetensors", "t5-fp8.safetensors",
                                              "t5-hf.safetensors")}
    code = (
        "import sys\n"
        "import turbowan.files.artifacts, turbowan.layout, turbowan.report.gallery, turbowan.files.modelfiles, turbowan.sheet\n"
        "import turbowan.report.summary  # what rules/*.smk import\n"
        "from turbowan.files.formats import inspect_model\n"
        f"for path in {list(files.values())!r}:\n"
        "    print(inspect_model(path).layout)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:-1] == [
        "wan-dit", "wan-dit-int8", "umt5-hf-fp8-scaled", "umt5-hf", "torch imported: False"]


# --------------------------------------------------------------------------- results on disk: durable, checked


def _record_syncs(monkeypatch):
    """Every fsync (by the path its descriptor names) and rename, in order."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_atomic_path_syncs_the_file_before_and_its_folder_after_the_rename(tmp_path, monkeypatch):
    from turbowan.files.artifacts import atomic_path

    events = _record_syncs(monkeypatch)
    final = tmp_path / "out" / "a.safetensors"
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"data")
    (rename,) = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert events[rename][1:] == (str(tmp), str(final))
    assert ("fsync", str(tmp)) in events[:rename]
    assert ("fsync", str(final.parent)) in events[rename + 1:]


def test_atomic_dir_syncs_every_file_and_folder_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    from turbowan.files.artifacts import atomic_dir

    final = tmp_path / "frames"
    final.mkdir()
    (final / "old.png").write_bytes(b"old")  # an old folder is replaced whole
    events = _record_syncs(monkeypatch)
    with atomic_dir(final) as tmp:
        (tmp / "00000.png").write_bytes(b"a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.json").write_text("{}")
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[1] == str(tmp))
    synced_before = {path for kind, path, *_ in events[:rename] if kind == "fsync"}
    assert {str(tmp / "00000.png"), str(tmp / "sub" / "x.json"), str(tmp / "sub"), str(tmp)} <= synced_before
    assert ("fsync", str(tmp_path)) in events[rename + 1:]
    assert sorted(p.name for p in final.iterdir()) == ["00000.png", "sub"]
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]  # nothing left beside it


def _frames(count=3, width=48, height=32):
    return torch.randint(0, 256, (count, height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_save_frames_syncs_each_png_and_load_frames_checks_each_one(tmp_path, monkeypatch):
    from turbowan.files.video import VideoError, check_frames, load_frames, save_frames

    events = _record_syncs(monkeypatch)
    folder = tmp_path / "frames"
    save_frames(_frames(), folder, {"row": "boat"})
    synced = {path.rsplit("/", 1)[1] for kind, path, *_ in events if kind == "fsync"}
    assert {"00000.png", "00001.png", "00002.png", "frames.json"} <= synced
    files, info = load_frames(folder)
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"] and info["row"] == "boat"
    assert check_frames(folder, 3, 48, 32) == files

    good = (folder / "00001.png").read_bytes()
    for damage, message in [
        (lambda p: p.write_bytes(b""), "00001.png: empty (0 bytes)"),
        (lambda p: p.write_bytes(good[: len(good) // 2]), "00001.png: not a complete PNG"),
        (lambda p: p.write_bytes(good[:-12]), "00001.png: not a complete PNG"),  # only the end chunk cut
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100), "00001.png: not a complete PNG"),
        (lambda p: Image.new("RGB", (32, 48)).save(p), "00001.png: a RGB frame of 32 x 48, expected RGB 48 x 32"),
        (lambda p: Image.new("L", (48, 32)).save(p), "00001.png: a L frame of 48 x 32, expected RGB 48 x 32"),
        (lambda p: p.unlink(), "2 frame files, expected 3; missing 00001.png"),
    ]:
        damage(folder / "00001.png")
        with pytest.raises(VideoError, match=re.escape(message)) as err:
            load_frames(folder)
        assert str(folder) in str(err.value)
        (folder / "00001.png").write_bytes(good)
    load_frames(folder)


def test_check_mp4_rejects_garbage_and_truncated_videos(tmp_path):
    import imageio_ffmpeg
    import numpy as np

    from turbowan.files.video import VideoError, check_mp4, save_frames, load_frames, write_mp4

    save_frames(_frames(9), tmp_path / "frames", {})
    files, _ = load_frames(tmp_path / "frames")
    video = tmp_path / "video.mp4"
    write_mp4(files, video, 48, 32, fps=16, quality=5)
    check_mp4(video, 9, 48, 32)
    with pytest.raises(VideoError, match=f"{re.escape(str(video))}: has 9 frames, expected 10"):
        check_mp4(video, 10, 48, 32)
    with pytest.raises(VideoError, match=f"{re.escape(str(video))}: is 48 x 32, expected 64 x 32"):
        check_mp4(video, 9, 64, 32)

    data = video.read_bytes()
    for name, content in [("empty.mp4", b""), ("garbage.mp4", bytes(range(256)) * 40),
                          ("cut.mp4", data[: len(data) // 2]), ("tail-cut.mp4", data[:-20])]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(VideoError, match=re.escape(str(bad))):
            check_mp4(bad, 9, 48, 32)

    # an index at the front (faststart): the frames after the cut are missing
    front = tmp_path / "faststart.mp4"
    writer = imageio_ffmpeg.write_frames(str(front), (48, 32), fps=16, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=16, output_params=["-f", "mp4", "-movflags", "+faststart"],
                                         ffmpeg_log_level="error")
    writer.send(None)
    for frame in _frames(9).numpy():
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    check_mp4(front, 9, 48, 32)
    cut = tmp_path / "faststart-cut.mp4"
    cut.write_bytes(front.read_bytes()[:-2000])
    with pytest.raises(VideoError, match=re.escape(str(cut))):
        check_mp4(cut, 9, 48, 32)


# --------------------------------------------------------------------------- model downloads (hub mocked: offline)

COMMIT_ID = "0123456789abcdef0123456789abcdef01234567"


def test_a_download_without_a_revision_is_refused(tmp_path):
    from turbowan.files.hub import DownloadError, hub_files

    models = {"vae": str(tmp_path / "Wan2.1_VAE.pth"), "tokenizer": str(tmp_path / "tok")}
    entries = {"vae": {"repo": "Wan-AI/Wan2.1-T2V-1.3B", "file": "Wan2.1_VAE.pth"},
               "tokenizer": {"repo": "Wan-AI/Wan2.1-T2V-1.3B", "folder": "google/umt5-xxl"}}
    with pytest.raises(DownloadError) as err:
        hub_files(models, entries)
    message = str(err.value)
    assert "without a revision" in message and "40-hex commit id" in message and "revision: main" in message
    assert "download.vae (Wan-AI/Wan2.1-T2V-1.3B, Wan2.1_VAE.pth)" in message and "download.tokenizer" in message
    entries["vae"]["revision"] = COMMIT_ID
    entries["tokenizer"]["revision"] = "main"  # following the branch, knowingly
    vae, tok = hub_files(models, entries)
    assert vae.revision == COMMIT_ID and vae.url.endswith(f"/resolve/{COMMIT_ID}/Wan2.1_VAE.pth")
    assert tok.revision == "main"


def test_a_pinned_file_needs_no_revision_in_the_config(tmp_path, monkeypatch):
    from turbowan.files import hub

    known = hub.KNOWN_FILES["Wan2.1_VAE.pth"]
    monkeypatch.setitem(hub.KNOWN_FILES, "Wan2.1_VAE.pth", hub.KnownFile(known.repo, known.path, COMMIT_ID))
    (vae,) = hub.hub_files({"vae": str(tmp_path / "v.pth")}, {"vae": {"repo": known.repo, "file": known.path}})
    assert vae.revision == COMMIT_ID
    assert all(k.revision is None or hub.COMMIT.match(k.revision) for k in hub.KNOWN_FILES.values())


def test_a_failed_download_keeps_what_it_fetched_for_the_next_attempt(tmp_path, monkeypatch):
    """A dropped connection leaves huggingface_hub's partial file where the next attempt looks for it."""
    import huggingface_hub

    from turbowan.files import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_unreachable", lambda: None)
    calls = []

    def fake_download(repo, filename, revision=None, local_dir=None, **kwargs):
        partial = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.etag.incomplete"
        calls.append((revision, local_dir, partial.exists() and partial.read_bytes()))
        if len(calls) == 1:
            partial.parent.mkdir(parents=True)
            partial.write_bytes(b"first half")
            raise ConnectionError("connection reset by peer")
        partial.write_bytes(partial.read_bytes() + b", second half")
        (Path(local_dir) / filename).write_bytes(partial.read_bytes())
        partial.unlink()
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    dest = tmp_path / "models" / "Wan2.1_VAE.pth"
    item = hub.HubFile("vae", "Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1_VAE.pth", str(dest), revision=COMMIT_ID)
    with pytest.raises(hub.DownloadError, match="ConnectionError: connection reset by peer") as err:
        hub.download(item, [item])
    staging = hub.staging_folder(item)
    assert f"stays in {staging}" in str(err.value)
    assert (staging / ".cache/huggingface/download/Wan2.1_VAE.pth.etag.incomplete").read_bytes() == b"first half"
    assert not dest.exists()

    hub.download(item, [item])  # the next attempt: the same folder, the partial file still there
    assert calls[1] == (COMMIT_ID, staging, b"first half")
    assert dest.read_bytes() == b"first half, second half"
    assert not staging.exists() and [p.name for p in dest.parent.iterdir()] == ["Wan2.1_VAE.pth"]
