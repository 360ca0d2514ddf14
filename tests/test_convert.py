"""prepare_models' writer and converter: same tensors as safetensors' own writer, checks before writing."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbowan.files.convert import prepare_model, write_safetensors
from turbowan.files.formats import CheckpointError


def test_streamed_file_reads_back_like_save_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "strided": torch.randn(6, 4, generator=g).t(),  # not contiguous
        "q": torch.randint(-128, 127, (3, 300), generator=g, dtype=torch.int8),
        "fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
    }
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(tensors, ours, metadata={"k": "v"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(theirs))
    a, b = load_file(ours), load_file(theirs)
    assert a.keys() == b.keys() == tensors.keys()
    for k in tensors:
        assert a[k].dtype == tensors[k].dtype and a[k].shape == tensors[k].shape
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_the_written_bytes_stay_those_of_earlier_conversions(tmp_path):
    """The converter keeps its own writer: safetensors' save_file (0.8) orders tensors by dtype, then
    name, so its file would differ from every checkpoint converted before. The digest is of this
    writer's output before safetensors 0.8 was required (tensors in name order, compact JSON header
    padded with spaces to 8 bytes)."""
    import hashlib
    import json

    tensors = {
        "w": (torch.arange(35, dtype=torch.float32) / 7).reshape(7, 5).to(torch.bfloat16),
        "strided": (torch.arange(24, dtype=torch.float32) - 11.5).reshape(6, 4).t(),
        "q": (torch.arange(900) % 255 - 127).to(torch.int8).reshape(3, 300),
        "fp8": (torch.arange(16, dtype=torch.float32) / 4).reshape(4, 4).to(torch.float8_e4m3fn),
        "i64": torch.arange(3) * 1000,
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
    }
    path = tmp_path / "golden.safetensors"
    write_safetensors(tensors, path, metadata={"turbowan": '{"stage": "prepare_models"}'})
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    assert header_len % 8 == 0 and list(json.loads(data[8: 8 + header_len]))[1:] == sorted(tensors)
    assert len(data) == 1673
    assert hashlib.sha256(data).hexdigest() == "66a851a71271d4219caad10888a23e26c0f97869f6948485bd9919e711bd8662"


def test_wrapped_state_dict_is_unwrapped(demo_models, tmp_path):
    vae = load_file(demo_models["vae"])
    source = tmp_path / "vae.pth"
    torch.save({"state_dict": vae, "step": 1000}, str(source))
    prepare_model(str(source), str(tmp_path / "vae.safetensors"), "vae")
    out = load_file(tmp_path / "vae.safetensors")
    assert out.keys() == vae.keys() and all(torch.equal(out[k], vae[k]) for k in vae)


def test_wrong_file_for_the_role_is_refused_before_writing(demo_models, tmp_path):
    source = tmp_path / "Wan2.1_VAE.pth"
    torch.save(load_file(demo_models["vae"]), str(source))
    out = tmp_path / "high.safetensors"
    with pytest.raises(CheckpointError, match=rf"{source}: is the Wan2.1 VAE .*models.high must be"):
        prepare_model(str(source), str(out), "high")
    assert list(tmp_path.iterdir()) == [source]  # no output, no partial file


class NotTensors:
    """Any class: unpickling it would import and run code, which weights_only refuses."""


def test_pickled_code_is_refused(tmp_path):
    source = tmp_path / "evil.pth"
    torch.save({"x": NotTensors()}, str(source))
    with pytest.raises(CheckpointError, match=rf"{source}: refused to load"):
        prepare_model(str(source), str(tmp_path / "out.safetensors"), "high")


def test_conversion_holds_no_second_copy_of_the_checkpoint(tmp_path):
    """Anonymous memory (not the mapped source pages) grows far less than the checkpoint's size."""
    import threading
    import time

    from turbowan.demo import DEMO_DIT, dit_tensors

    config = {**DEMO_DIT, "num_attention_heads": 8, "ffn_dim": 8192, "num_layers": 4}
    source = tmp_path / "expert.pth"
    torch.save({f"net.{k}": v for k, v in dit_tensors(0, config).items()}, str(source))
    size_kb = source.stat().st_size / 1024  # ~200 MB

    def anon_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))

    done = threading.Event()

    def watch():
        while not done.is_set():
            peak.append(anon_kb())
            time.sleep(0.002)

    prepare_model(str(source), str(tmp_path / "warm.safetensors"), "high")  # imports and caches warmed up
    start = anon_kb()
    peak = [start]
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        prepare_model(str(source), str(tmp_path / "expert.safetensors"), "high")
    finally:
        done.set()
        watcher.join()
    # A second copy would be the checkpoint's size or more. What a streaming conversion holds is a
    # few 17 MB tensors at a time plus what the allocator keeps of them: up to 61 MB seen (a quarter of
    # the size, the bound before, failed about one run in four).
    growth = max(peak) - start
    assert growth < size_kb / 2, (growth, size_kb)
