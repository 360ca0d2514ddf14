"""CPU reads go through safetensors' pread backend and leave nothing of the file mapped; the GPU
streaming reader (SafetensorsFile, kept for to_device) gives safetensors' own tensors."""

import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from turbowan.files.safetensors_io import SafetensorsFile, SafetensorsFormatError


def test_every_dtype_reads_back_identically(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16), "f32": torch.randn(7), "f16": torch.randn(2, 2).half(),
        "f64": torch.randn(4, dtype=torch.float64), "i8": torch.randint(-128, 127, (9,), dtype=torch.int8),
        "u8": torch.randint(0, 255, (3, 3), dtype=torch.uint8), "i64": torch.arange(5),
        "f8": torch.randn(6).to(torch.float8_e4m3fn), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
        "bool": torch.tensor([True, False]),
    }
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    with SafetensorsFile(path) as ours, safe_open(str(path), "pt") as theirs:
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for name in theirs.keys():
            a, b = ours.get_tensor(name), theirs.get_tensor(name)
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), name


def test_demo_expert_reads_back_identically(demo_models):
    with SafetensorsFile(demo_models["high"]) as ours, safe_open(demo_models["high"], "pt") as theirs:
        for name in theirs.keys():
            assert torch.equal(ours.get_tensor(name), theirs.get_tensor(name))


def resident_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def mappings_of(path) -> list[str]:
    """This process's memory mappings of `path` (lines of /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return [line for line in f if line.rstrip("\n").endswith(str(path))]


def test_a_cpu_read_tensor_by_tensor_keeps_only_one_in_memory(tmp_path):
    """A model's tensors read onto the CPU (turbowan.wan.models, the pread backend) one at a time:
    the job's RSS holds the tensor in hand, not the pages of the file read so far."""
    from turbowan.wan.models import _open_tensors

    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.ones(4 * 1024**2) for i in range(24)}, str(path))  # 24 x 16 MB = 384 MB
    names = [f"t{i}" for i in range(24)]
    before = resident_mb()
    peak = before
    with _open_tensors(SimpleNamespace(container="safetensors", path=path), names, torch.device("cpu")) as (_, got):
        for name, tensor in got:
            assert tensor.sum().item() == 4 * 1024**2
            del tensor
            peak = max(peak, resident_mb())
    assert peak - before < 100, f"RSS grew by {peak - before:.0f} MB reading a 384 MB file"


def test_a_cpu_model_load_leaves_nothing_of_the_file_mapped(demo_models, tmp_path):
    from turbowan.files.formats import inspect_model
    from turbowan.wan.models import _open_tensors, load_transformer

    path = tmp_path / "expert.safetensors"  # (a path of its own: no other test maps it)
    shutil.copy(demo_models["high"], path)
    with safe_open(str(path), "pt") as f:  # what the check would see with safetensors' default backend
        mapped = f.get_tensor("head.modulation")
    assert mappings_of(path)
    del mapped
    assert not mappings_of(path)

    info = inspect_model(path)
    names = list(info.index)
    with _open_tensors(info, names, torch.device("cpu")) as (get, arriving):
        got = {}
        for name, tensor in arriving:
            assert not mappings_of(path), name  # during each read
            got[name] = tensor
        assert torch.equal(get("head.modulation"), got["head.modulation"]) and not mappings_of(path)
    with safe_open(str(path), "pt") as f:
        assert set(got) == set(f.keys()) and all(torch.equal(got[k], f.get_tensor(k)) for k in f.keys())
        del f
    assert not mappings_of(path)

    model = load_transformer(path, torch.device("cpu"))
    assert not mappings_of(path), "the loaded expert's weights are views of the file"
    del model


def test_a_loaded_artifact_leaves_nothing_of_the_file_mapped(tmp_path):
    from turbowan.files.artifacts import check_digest, load_artifact, save_artifact

    path = tmp_path / "latent.safetensors"
    save_artifact(path, {"x": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}, "sample_low", {"seed": 1})
    tensors, _ = load_artifact(path, "sample_low", {"x": ((64, 64), torch.float32)})
    assert not mappings_of(path)  # (with the "mmap" backend, the tensor would hold the mapping now)
    tensors["x"].add_(1)  # memory of its own: writable, and the file is untouched
    assert check_digest(path) is None and not mappings_of(path)
    again, _ = load_artifact(path, "sample_low", {"x": ((64, 64), torch.float32)})
    assert torch.equal(again["x"] + 1, tensors["x"])


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"x": torch.zeros(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SafetensorsFormatError, match="header needs"):
        SafetensorsFile(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(SafetensorsFormatError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "junk.safetensors")


def staged_file(tmp_path):
    """Tensors of many sizes, some larger than the test's slabs, in a mixed order."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i:02d}": torch.randn(n, generator=gen).to(torch.bfloat16 if i % 2 else torch.float32)
               for i, n in enumerate([10, 300, 5000, 7, 2048, 40000, 1, 999, 65536, 3])}
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_read_ahead_through_reused_slabs_gives_every_tensor_in_order(tmp_path):
    path, tensors = staged_file(tmp_path)
    names = list(reversed(list(tensors)))
    with SafetensorsFile(path) as f:
        # 3 slabs of 16 KB: slabs are reused many times, and the 40000- and 65536-element tensors
        # are bigger than a slab and go through on their own; the small ones share reads
        runs = f._runs(names, 16 * 1024)
        got = list(f.to_device(names, torch.device("cpu"), slab_bytes=16 * 1024, slabs=3))
        order = sorted(names, key=lambda n: f.entries[n]["data_offsets"])
    assert [name for name, _ in got] == order  # the file's order
    # runs: the file's order cut greedily into reads of at most a slab (or one larger tensor)
    assert [name for _, _, run_names in runs for name in run_names] == order
    assert all(end - start <= 16 * 1024 or len(run_names) == 1 for start, end, run_names in runs)
    first_end = {name: f.entries[name]["data_offsets"][1] for name in names}
    assert all(first_end[later[0]] - start > 16 * 1024 for (start, _, _), (_, _, later) in zip(runs, runs[1:]))
    assert max(len(run_names) for _, _, run_names in runs) > 1
    for name, tensor in got:
        assert tensor.dtype == tensors[name].dtype and torch.equal(tensor, tensors[name]), name
    # each yielded tensor owns its memory: a later read must not have overwritten an earlier one
    assert len({t.data_ptr() for _, t in got}) == len(got)
