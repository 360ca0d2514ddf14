"""Artifacts are written atomically and checked when read."""

import pytest
import torch

from turbowan.files.artifacts import ArtifactError, atomic_path, load_artifact, read_record, save_artifact


def save(path, **params):
    save_artifact(path, {"x": torch.zeros(1, 2, 3, dtype=torch.float64)}, stage="sample_low",
                  params={"seed": 1, **params})


def test_round_trip_records_stage_params_and_versions(tmp_path):
    up = tmp_path / "up.bin"
    up.write_bytes(b"abc")
    save_artifact(tmp_path / "a.safetensors", {"x": torch.ones(2)}, "s", {"k": 1.5}, inputs={"up": up})
    tensors, record = load_artifact(tmp_path / "a.safetensors", "s", {"x": ((2,), torch.float32)}, params={"k": 1.5})
    assert torch.equal(tensors["x"], torch.ones(2))
    assert record["params"] == {"k": 1.5} and record["inputs"]["up"]["size"] == 3
    assert set(record["versions"]) >= {"torch", "diffusers", "transformers", "turbowan"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stage="decode", expect={}), "written by stage 'sample_low', expected 'decode'"),
        (dict(stage="sample_low", expect={"y": (None, torch.float64)}), "has no tensor 'y'"),
        (dict(stage="sample_low", expect={"x": ((1, 2, 4), torch.float64)}), r"shape \[1, 2, 3\], expected \[1, 2, 4\]"),
        (dict(stage="sample_low", expect={"x": (None, torch.float32)}), "is torch.float64, expected torch.float32"),
        (dict(stage="sample_low", expect={}, params={"seed": 2}), "was made with seed=1, but this job needs seed=2"),
        (dict(stage="sample_low", expect={}, params={"steps": 2}), "records no parameter 'steps'"),
    ],
)
def test_mismatches_are_named(tmp_path, kwargs, message):
    path = tmp_path / "latent.safetensors"
    save(path)
    with pytest.raises(ArtifactError, match=message) as err:
        load_artifact(path, **kwargs)
    assert str(path) in str(err.value)


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "boundary.safetensors"
    save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(ArtifactError, match="boundary.safetensors"):
        load_artifact(path, "sample_low", {"x": (None, torch.float64)})


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ArtifactError, match="no 'turbowan' record"):
        read_record(tmp_path / "other.safetensors")


def test_failed_write_leaves_nothing(tmp_path):
    final = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_existing_artifact_survives_a_failed_rewrite(tmp_path):
    final = tmp_path / "out.safetensors"
    save(final)
    before = final.read_bytes()
    with pytest.raises(OSError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
    assert final.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("damage", [lambda b: b[:4], lambda b: b"\xff" * 8 + b[8:], lambda b: b + b"xx"])
def test_quick_check_spots_damage_without_reading_the_data(tmp_path, damage):
    from turbowan.files.artifacts import quick_check

    path = tmp_path / "a.safetensors"
    save(path)
    assert quick_check(path) is None
    path.write_bytes(damage(path.read_bytes()))
    assert quick_check(path)
