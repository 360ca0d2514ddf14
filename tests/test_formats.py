"""Model files told apart by content, every layout of the same weights giving the same network, and a
clear error (naming the file) for each kind of wrong file."""

import pytest
import torch
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
