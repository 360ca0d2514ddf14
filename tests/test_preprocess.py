"""Sizes, image preprocessing, text tokenisation and the conditioning tensor (docs/reference.md, "Conditioning")."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from turbowan.files.artifacts import load_artifact
from turbowan.stages.conditioning import encode_image
from turbowan.wan.image import ImageError, image_size, open_rgb, preprocess
from turbowan.wan.models import load_text_encoder, load_tokenizer, load_vae
from turbowan.wan.sizes import PRESETS, adaptive_size, choose_size, frames_ok, latent_shape, size_problem
from turbowan.wan.text import TEXT_LEN, clean_prompt, encode_text, tokenize
from turbowan.wan.vae import decode_frames, encode_condition

from .conftest import write_image


def test_presets_and_latent_shapes():
    assert PRESETS["480p"]["16:9"] == (832, 480) and PRESETS["720p"]["9:16"] == (720, 1280)
    assert latent_shape(81, 832, 480) == (1, 16, 21, 60, 104)
    assert latent_shape(81, 1280, 720) == (1, 16, 21, 90, 160)
    w, h = PRESETS["720p"]["16:9"]
    tokens = 21 * (h // 16) * (w // 16)
    assert tokens == 75_600


@pytest.mark.parametrize("resolution, expected", [("720p", (1280, 720)), ("480p", (848, 480))])
def test_adaptive_size_from_a_1080p_image(resolution, expected):
    assert adaptive_size(resolution, "16:9", 1920, 1080) == expected


def test_choose_size_precedence():
    assert choose_size("720p", "16:9", True, 64, 32, (1920, 1080)) == (64, 32)  # explicit wins
    assert choose_size("720p", "16:9", True, None, None, (1080, 1920)) == (720, 1280)  # adaptive
    assert choose_size("480p", "1:1", False, None, None, (1920, 1080)) == (640, 640)  # preset


def test_size_and_frame_rules():
    assert size_problem(832, 480) is None
    assert "multiple of 16" in size_problem(840, 480)
    assert "above 2048" in size_problem(2064, 480)
    assert [n for n in range(1, 20) if frames_ok(n)] == [1, 5, 9, 13, 17]


def test_preprocess_matches_uint8_antialiased_bilinear(tmp_path):
    path = write_image(tmp_path / "a.png", 123, 77, seed=1)
    img = open_rgb(path)
    out = preprocess(img, 48, 32)
    assert out.shape == (1, 3, 32, 48) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    expected = F.interpolate(pixels, size=(32, 48), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(out, expected.float() / 255 * 2 - 1)


def test_images_of_any_mode_become_rgb(tmp_path):
    rgba = write_image(tmp_path / "rgba.png", 20, 10, mode="RGBA")
    Image.new("L", (20, 10), 128).save(tmp_path / "grey.png")
    Image.new("I;16", (20, 10), 40000).save(tmp_path / "deep.png")
    Image.new("CMYK", (20, 10), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    for name in (rgba, tmp_path / "grey.png", tmp_path / "deep.png", tmp_path / "cmyk.jpg"):
        img = open_rgb(name)
        assert img.mode == "RGB" and img.size == (20, 10)
    assert open_rgb(tmp_path / "deep.png").getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256


def test_exif_rotation_swaps_the_size(tmp_path):
    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert image_size(tmp_path / "rot.jpg") == (20, 40)
    assert open_rgb(tmp_path / "rot.jpg").size == (20, 40)


def test_broken_image_is_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png"):
        open_rgb(tmp_path / "bad.png")


def test_clean_prompt():
    assert clean_prompt("  a  &amp;amp; b \n\t c ") == "a & b c"
    assert clean_prompt("caf\u00c3\u00a9") == "café"  # ftfy repairs mojibake


def test_tokens_padded_to_512_with_eos(demo_models):
    tok = load_tokenizer(demo_models["tokenizer"])
    ids, mask = tokenize(tok, "a cat walks")
    assert ids.shape == mask.shape == (1, TEXT_LEN)
    n = int(mask.sum())
    assert 1 < n < TEXT_LEN and ids[0, n - 1].item() == tok.eos_token_id
    assert (ids[0, n:] == tok.pad_token_id).all()
    long_ids, long_mask = tokenize(tok, "cat " * 2000)
    assert long_mask.sum() == TEXT_LEN and long_ids[0, -1].item() == tok.eos_token_id


def test_text_embedding_zero_after_true_length(demo_models):
    enc = load_text_encoder(demo_models["text_encoder"], torch.device("cpu"))
    emb, length = encode_text(enc, load_tokenizer(demo_models["tokenizer"]), "a dog, \"quoted\" — ünïcode", "cpu")
    assert emb.shape == (1, TEXT_LEN, 32) and emb.dtype == torch.bfloat16
    assert emb[0, :length].abs().sum() > 0 and (emb[0, length:] == 0).all()


def test_conditioning_tensor_layout(demo_models, tmp_path):
    vae = load_vae(demo_models["vae"], torch.device("cpu"))
    image = preprocess(open_rgb(write_image(tmp_path / "a.png", 50, 30)), 48, 32)
    y = encode_condition(vae, image, 9)
    assert y.shape == (1, 20, 3, 4, 6) and y.dtype == torch.bfloat16
    assert (y[:, :4, 0] == 1).all() and (y[:, :4, 1:] == 0).all()
    assert y[:, 4:].abs().sum() > 0
    # the latent is the VAE's encoding of the image followed by 8 black frames, normalised
    with torch.no_grad():
        mu = vae.encode(torch.cat([image[:, :, None], torch.zeros(1, 3, 8, 32, 48)], dim=2)).latent_dist.mean
    mean, std = (torch.tensor(getattr(vae.config, f)).view(1, -1, 1, 1, 1) for f in ("latents_mean", "latents_std"))
    assert torch.equal(y[:, 4:], ((mu - mean) / std).to(torch.bfloat16))
    frames = decode_frames(vae, torch.zeros(1, 16, 3, 4, 6, dtype=torch.float64))
    assert frames.shape == (9, 32, 48, 3) and frames.dtype == torch.uint8


def test_encode_image_stage_records_its_parameters(demo_models, tmp_path):
    out = tmp_path / "cond.safetensors"
    video = {"width": 48, "height": 32, "num_frames": 5}
    encode_image(str(write_image(tmp_path / "a.png", 50, 30)), demo_models["vae"], str(out), video, "cpu")
    tensors, record = load_artifact(out, "encode_image", {"y": ((1, 20, 2, 4, 6), torch.bfloat16)}, params=video)
    assert record["inputs"]["image"]["sha256"] and record["versions"]["torch"] == torch.__version__
