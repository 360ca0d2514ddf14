"""The split sampler (two jobs, state on disk) equals the single-process loop, bit for bit."""

import pytest
import torch

from turbowan.files.artifacts import ArtifactError, load_artifact
from turbowan.wan.models import load_transformer
from turbowan.wan.sampler import dit_velocity, rcm_step, sample_single_process
from turbowan.stages import loading
from turbowan.stages.conditioning import encode_image
from turbowan.stages.prompt import encode_prompt
from turbowan.stages.sampling import sample_high, sample_low
from turbowan.wan.sizes import latent_shape

VIDEO = {"width": 48, "height": 32, "num_frames": 9}


@pytest.fixture(scope="module")
def conditions(demo_models, tmp_path_factory):
    from tests.conftest import prompt_sheet, write_image

    folder = tmp_path_factory.mktemp("cond")
    image = write_image(folder / "in.png", 60, 40, seed=3)
    text, cond = str(folder / "text.safetensors"), str(folder / "cond.safetensors")
    encode_prompt(*prompt_sheet(folder, "a red car, in the rain"), demo_models["text_encoder"], demo_models["tokenizer"], text, "cpu")
    encode_image(str(image), demo_models["vae"], cond, VIDEO, "cpu")
    return text, cond


def single_process(demo_models, text, cond, sampling, device="cpu"):
    text_emb = load_artifact(text, "encode_prompt", {"text": (None, torch.bfloat16)}, device=device)[0]["text"]
    y = load_artifact(cond, "encode_image", {"y": (None, torch.bfloat16)}, device=device)[0]["y"]
    high = load_transformer(demo_models["high"], torch.device(device))
    low = load_transformer(demo_models["low"], torch.device(device))
    return sample_single_process(
        dit_velocity(high, text_emb, y, torch.bfloat16), dit_velocity(low, text_emb, y, torch.bfloat16),
        latent_shape(**VIDEO), sampling["seed"], sampling["num_steps"], sampling["sigma_max"],
        sampling["boundary"], sampling["ode"], device,
    )


@pytest.mark.parametrize("ode", [False, True], ids=["sde", "ode"])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4])
def test_split_equals_single_process(demo_models, conditions, tmp_path, ode, num_steps):
    text, cond = conditions
    sampling = {"seed": 1234, "num_steps": num_steps, "sigma_max": 200.0, "boundary": 0.9, "ode": ode}
    boundary, latent = str(tmp_path / "boundary.safetensors"), str(tmp_path / "latent.safetensors")
    sample_high(text, cond, demo_models["high"], boundary, sampling, VIDEO, "cpu")
    sample_low(text, cond, boundary, demo_models["low"], latent, sampling, VIDEO, "cpu")
    split = load_artifact(latent, "sample_low", {"x": (latent_shape(**VIDEO), torch.float64)})[0]["x"]

    reference = single_process(demo_models, text, cond, sampling)
    assert reference.dtype == torch.float64
    assert torch.equal(split, reference)
    # and the network really changed the state (the test would be empty otherwise)
    noise_only = single_process(demo_models, text, cond, {**sampling, "seed": 1235})
    assert not torch.equal(split, noise_only)


@pytest.mark.parametrize("num_steps, low_loaded", [(1, False), (2, False), (3, True), (4, True)])
def test_low_expert_loaded_only_when_it_has_steps(demo_models, conditions, tmp_path, monkeypatch, num_steps, low_loaded):
    text, cond = conditions
    sampling = {"seed": 5, "num_steps": num_steps, "sigma_max": 200.0, "boundary": 0.9, "ode": False}
    boundary = str(tmp_path / "boundary.safetensors")
    sample_high(text, cond, demo_models["high"], boundary, sampling, VIDEO, "cpu")
    loaded = []
    real = loading.load_transformer
    monkeypatch.setattr(loading, "load_transformer", lambda path, *a, **k: loaded.append(path) or real(path, *a, **k))
    sample_low(text, cond, boundary, demo_models["low"], str(tmp_path / "latent.safetensors"), sampling, VIDEO, "cpu")
    assert loaded == ([demo_models["low"]] if low_loaded else [])
    saved = load_artifact(boundary, "sample_high", {"next_step": ((1,), torch.int64)})[0]
    assert saved["next_step"].item() == min(num_steps, 2)


def test_one_shared_context_loads_each_expert_once_and_gives_the_same_latents(demo_models, conditions, tmp_path,
                                                                             monkeypatch):
    """Rows through one StageContext (as a worker, or bench's reference loop, keeps one) equal rows
    each run with a fresh context; the experts are loaded for the first row only."""
    from turbowan.stages.context import StageContext

    text, cond = conditions
    rows = {"a": {"seed": 11, "num_steps": 4, "sigma_max": 200.0, "boundary": 0.9, "ode": False},
            "b": {"seed": 12, "num_steps": 3, "sigma_max": 200.0, "boundary": 0.9, "ode": True}}

    def run(folder, ctx_for):
        folder.mkdir()
        latents = {}
        for name, sampling in rows.items():
            boundary, latent = str(folder / f"{name}-b.safetensors"), str(folder / f"{name}-l.safetensors")
            sample_high(text, cond, demo_models["high"], boundary, sampling, VIDEO, "cpu", ctx=ctx_for())
            sample_low(text, cond, boundary, demo_models["low"], latent, sampling, VIDEO, "cpu", ctx=ctx_for())
            latents[name] = load_artifact(latent, "sample_low", {"x": (latent_shape(**VIDEO), torch.float64)})[0]["x"]
        return latents

    fresh = run(tmp_path / "fresh", lambda: None)
    loaded = []
    real = loading.load_transformer
    monkeypatch.setattr(loading, "load_transformer", lambda path, *a, **k: loaded.append(path) or real(path, *a, **k))
    ctx = StageContext()
    shared = run(tmp_path / "shared", lambda: ctx)
    assert sorted(loaded) == sorted([demo_models["high"], demo_models["low"]])
    assert len(ctx.models) == 2
    for name in rows:
        assert torch.equal(shared[name], fresh[name]), name
    assert not torch.equal(shared["a"], shared["b"])


def test_low_stage_refuses_a_boundary_made_with_other_parameters(demo_models, conditions, tmp_path):
    text, cond = conditions
    sampling = {"seed": 5, "num_steps": 4, "sigma_max": 200.0, "boundary": 0.9, "ode": False}
    boundary = str(tmp_path / "boundary.safetensors")
    sample_high(text, cond, demo_models["high"], boundary, sampling, VIDEO, "cpu")
    with pytest.raises(ArtifactError, match=r"boundary.safetensors: was made with seed=5.*seed=6"):
        sample_low(text, cond, boundary, demo_models["low"], str(tmp_path / "l.safetensors"),
                          {**sampling, "seed": 6}, VIDEO, "cpu")
    assert not (tmp_path / "l.safetensors").exists()


def test_sde_step_keeps_official_dtypes():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, dtype=torch.float64)
    v = torch.randn(1, 4, dtype=torch.float64)
    t_cur, t_next = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    out = rcm_step(x, v, t_cur, t_next, False, g1)
    noise = torch.randn(1, 4, dtype=torch.float32, generator=g2)
    scaled = t_next * noise
    assert scaled.dtype == torch.float32  # t_next * noise is a float32 product
    assert out.dtype == torch.float64 and torch.equal(out, (1 - t_next) * (x - t_cur * v) + scaled)
    assert torch.equal(rcm_step(x, v, t_cur, t_next, True, g1), x - (t_cur - t_next) * v)
