"""First-and-last-frame rows (`last_image`): the conditioning's layout, checked against diffusers'
WanImageToVideoPipeline, which documents the rule (its prepare_latents with last_image)."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import WanImageToVideoPipeline

from turbowan.files.artifacts import load_artifact
from turbowan.stages.conditioning import encode_image
from turbowan.wan.image import open_rgb, preprocess
from turbowan.wan.models import load_vae
from turbowan.wan.vae import condition_mask, encode_condition

from .conftest import write_image

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vae(demo_models):
    return load_vae(demo_models["vae"], CPU)


def diffusers_condition(vae, first, last, num_frames, height, width):
    """diffusers' y for the same pictures: prepare_latents of its Wan image-to-video pipeline, called
    with just what it reads of the pipeline (the VAE and its strides)."""
    pipeline = SimpleNamespace(vae=vae, vae_scale_factor_temporal=4, vae_scale_factor_spatial=8,
                               config=SimpleNamespace(expand_timesteps=False))
    lat_t = (num_frames - 1) // 4 + 1
    with torch.no_grad():
        _, condition = WanImageToVideoPipeline.prepare_latents(
            pipeline, first, 1, 16, height, width, num_frames, torch.float32, CPU,
            latents=torch.zeros(1, 16, lat_t, height // 8, width // 8), last_image=last)
    return condition  # [1, 20, lat_t, lat_h, lat_w]: mask, then the normalised latent


@pytest.mark.parametrize("num_frames", [5, 9, 17])
@pytest.mark.parametrize("with_last", [False, True], ids=["first-only", "first-and-last"])
def test_y_is_diffusers_condition(vae, tmp_path, num_frames, with_last):
    first = preprocess(open_rgb(write_image(tmp_path / "a.png", 50, 30, seed=1)), 48, 32)
    last = preprocess(open_rgb(write_image(tmp_path / "b.png", 70, 20, seed=2)), 48, 32) if with_last else None
    y = encode_condition(vae, first, num_frames, last)
    expected = diffusers_condition(vae, first, last, num_frames, 32, 48)
    assert y.shape == expected.shape
    assert torch.equal(y[:, :4].float(), expected[:, :4])  # the mask, exactly
    # the latent: the same VAE pass, normalised as (mu - mean) / std here and (mu - mean) * (1 / std)
    # there, so equal to a float32 rounding, then both in bfloat16
    torch.testing.assert_close(y[:, 4:], expected[:, 4:].to(torch.bfloat16), rtol=2**-7, atol=1e-6)


def test_the_mask_marks_the_last_frame_in_the_last_latent_frames_last_channel():
    mask = condition_mask(9, (3, 2, 2), last=True)  # 9 frames: latent frames {0}, {1..4}, {5..8}
    assert mask[0, :, :, 0, 0].tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1]]
    assert torch.equal(condition_mask(9, (3, 2, 2))[:, :, 0], torch.ones(1, 4, 2, 2))
    assert condition_mask(9, (3, 2, 2))[:, :, 1:].sum() == 0


def test_a_last_image_changes_the_cond_artifact_in_the_last_latent_frame_only(demo_models, tmp_path):
    video = {"width": 48, "height": 32, "num_frames": 9}
    first, last = write_image(tmp_path / "a.png", 50, 30, seed=1), write_image(tmp_path / "b.png", 64, 64, seed=2)
    spec = {"y": ((1, 20, 3, 4, 6), torch.bfloat16)}
    encode_image(str(first), demo_models["vae"], str(tmp_path / "free.safetensors"), video, "cpu")
    encode_image(str(first), demo_models["vae"], str(tmp_path / "ends.safetensors"), video, "cpu", last_image=str(last))
    free, free_record = load_artifact(tmp_path / "free.safetensors", "encode_image", spec, params=video)
    ends, ends_record = load_artifact(tmp_path / "ends.safetensors", "encode_image", spec, params=video)
    # the VAE is causal in time: the last picture reaches only the last latent frame
    assert torch.equal(free["y"][:, :, :-1], ends["y"][:, :, :-1])
    assert free["y"][0, :4, -1].sum() == 0 and ends["y"][0, :4, -1, 0, 0].tolist() == [0, 0, 0, 1]
    assert (free["y"][:, 4:, -1] != ends["y"][:, 4:, -1]).any()
    # the record names the last image only when there is one (a row without keeps today's bytes)
    assert "last_image" not in free_record["inputs"] and ends_record["inputs"]["last_image"]["sha256"]
    # resized like the first picture: a last image of another size gives the row's latent size
    assert ends["y"].shape == free["y"].shape
