"""Official checkpoint key names <-> diffusers/transformers modules, and streaming loaders."""

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import UMT5Config, UMT5EncoderModel

from turbowan.demo import DEMO_DIT, DEMO_T5, DEMO_VAE
from turbowan.wan.keymaps import (
    dit_key_to_official, dit_rename_table, t5_key_to_hf, t5_key_to_official, vae_key_to_official,
    vae_rename_table,
)
from turbowan.wan.models import CheckpointError, load_text_encoder, load_transformer, load_vae


def test_dit_names_invert_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    keys = list(WanTransformer3DModel(**DEMO_DIT).state_dict())
    official = [dit_key_to_official(k) for k in keys]
    assert "blocks.0.norm3.weight" in official and "head.modulation" in official
    assert "blocks.1.self_attn.o.weight" in official and "time_projection.1.weight" in official
    table = dit_rename_table(official)
    assert table == {k: dit_key_to_official(k) for k in keys}
    # our own forward names (no diffusers import while an expert streams) are diffusers' converter's,
    # for the int8 layout's names too
    int8 = [k.replace(".weight", ".int8_weight") for k in official if k.startswith("blocks.")]
    int8 += [k.replace(".weight", ".scale") for k in official if k.startswith("blocks.")]
    for names in (official, int8):
        assert dit_rename_table(names) == convert_wan_transformer_to_diffusers({k: k for k in names})


def test_dit_wrapper_prefixes_are_stripped():
    table = dit_rename_table(["net.blocks.0._checkpoint_wrapped_module.self_attn.q.weight"])
    assert table == {"blocks.0.attn1.to_q.weight": "net.blocks.0._checkpoint_wrapped_module.self_attn.q.weight"}


def test_vae_names_invert_diffusers_converter():
    keys = list(AutoencoderKLWan(**DEMO_VAE).state_dict())
    official = [vae_key_to_official(k) for k in keys]
    assert len(set(official)) == 194
    assert {"conv1.weight", "conv2.weight", "decoder.upsamples.4.shortcut.weight"} <= set(official)
    assert vae_rename_table(official) == {k: vae_key_to_official(k) for k in keys}


def test_t5_names_round_trip():
    keys = [k for k in UMT5EncoderModel(UMT5Config(**DEMO_T5)).state_dict() if k != "encoder.embed_tokens.weight"]
    official = [t5_key_to_official(k) for k in keys]
    assert len(official) == 1 + 2 * 10 + 1  # the real encoder: 1 + 24 * 10 + 1 = 242
    assert [t5_key_to_hf(k) for k in official] == keys


def test_loaded_expert_has_the_files_weights(demo_models):
    model = load_transformer(demo_models["high"], torch.device("cpu"))
    assert model.config.num_attention_heads == 2 and model.config.num_layers == 2
    state = model.state_dict()
    with safe_open(demo_models["high"], "pt") as f:
        patch = f.get_tensor("patch_embedding.weight")
        assert patch.shape == (256, 144) and patch.dtype == torch.bfloat16
        assert torch.equal(state["patch_embedding.weight"], patch.reshape(256, 36, 1, 2, 2))
        assert torch.equal(state["blocks.1.attn2.to_out.0.weight"], f.get_tensor("blocks.1.cross_attn.o.weight"))
        # diffusers' float32 modules stay float32
        assert state["blocks.0.norm2.weight"].dtype == torch.float32
        assert torch.equal(state["blocks.0.norm2.weight"], f.get_tensor("blocks.0.norm3.weight").float())
    assert state["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16


def test_loaded_vae_and_text_encoder_match_their_files(demo_models):
    vae = load_vae(demo_models["vae"], torch.device("cpu"))
    with safe_open(demo_models["vae"], "pt") as f:
        assert torch.equal(vae.state_dict()["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"],
                           f.get_tensor("decoder.upsamples.4.shortcut.weight"))
    enc = load_text_encoder(demo_models["text_encoder"], torch.device("cpu"))
    with safe_open(demo_models["text_encoder"], "pt") as f:
        emb = f.get_tensor("token_embedding.weight")
        assert torch.equal(enc.shared.weight, emb) and torch.equal(enc.encoder.embed_tokens.weight, emb)


def test_a_clip_like_text_encoder_is_refused(tmp_path):
    path = tmp_path / "clip.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8)}, str(path))
    with pytest.raises(CheckpointError, match=r"clip.safetensors: a CLIP model .*umT5-XXL encoder"):
        load_text_encoder(path, torch.device("cpu"))


def test_a_wan21_clip_dit_is_refused(tmp_path, demo_models):
    with safe_open(demo_models["high"], "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["img_emb.proj.0.weight"] = torch.zeros(4)
    save_file(tensors, str(tmp_path / "wan21.safetensors"))
    with pytest.raises(CheckpointError, match="CLIP image inputs"):
        load_transformer(tmp_path / "wan21.safetensors", torch.device("cpu"))


def test_truncated_and_missing_files_are_named(tmp_path, demo_models):
    data = open(demo_models["vae"], "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_vae(tmp_path / "cut.safetensors", torch.device("cpu"))
    with pytest.raises(CheckpointError, match="nothere.safetensors: model file not found"):
        load_vae(tmp_path / "nothere.safetensors", torch.device("cpu"))


def run_expert(model, latent_size: tuple[int, int, int], seed: int) -> torch.Tensor:
    """The expert once on random inputs (a latent of `latent_size` frames x height x width, 16 text
    tokens), the same for every model given the same seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 36, *latent_size, generator=gen)
    text = torch.randn(1, 16, model.config.text_dim, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), text, return_dict=False)[0]


def test_feed_forward_in_slices_gives_the_same_output_with_a_slice_of_the_activations(demo_models):
    from turbowan.wan.slicing import ChunkedFeedForward

    cpu = torch.device("cpu")
    whole = load_transformer(demo_models["high"], cpu, torch.float32, attention="sdpa", activation_slices=1)
    sliced = load_transformer(demo_models["high"], cpu, torch.float32, attention="sdpa", activation_slices=3)
    assert all(isinstance(block.ffn, ChunkedFeedForward) and block.ffn.chunks == 3 for block in sliced.blocks)
    widths = []  # tokens reaching the FFN's wide hidden layer, per call
    sliced.blocks[0].ffn.ffn.net[0].register_forward_hook(lambda _m, _i, out: widths.append(out.shape[1]))
    size = (2, 8, 12)  # 2 x 4 x 6 = 48 tokens after 1x2x2 patches
    torch.testing.assert_close(run_expert(sliced, size, 0), run_expert(whole, size, 0), rtol=1e-5, atol=1e-5)
    assert widths == [16, 16, 16]


def test_float32_modules_are_diffusers_own():
    """The weights stream in their final dtypes before diffusers is imported, from this list."""
    from turbowan.wan.models import DIT_FP32_MODULES

    assert DIT_FP32_MODULES == set(WanTransformer3DModel._keep_in_fp32_modules) | {"proj_l"}


def test_a_load_that_fails_while_building_stops_its_stream(demo_models, monkeypatch):
    """The file streams in a thread while diffusers is imported; a failure there must not leave it running."""
    import threading

    import turbowan.wan.models as models

    reached = []

    def refuse(*_args, **_kwargs):
        reached.append(True)
        raise ValueError("no attention today")

    monkeypatch.setattr(models, "resolve_attention", refuse)
    with pytest.raises(ValueError, match="no attention today"):
        load_transformer(demo_models["high"], torch.device("cpu"))
    assert reached
    assert not [t for t in threading.enumerate() if t.name.startswith("stream")]


def test_a_stream_error_names_the_file(tmp_path, demo_models):
    """A file cut short is refused by name, now that its tensors are read in the streaming thread."""
    data = open(demo_models["high"], "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 64])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_transformer(tmp_path / "cut.safetensors", torch.device("cpu"))


def test_compiled_blocks_give_the_eager_output(demo_models):
    """torch.compile over the blocks (here with dynamo's eager backend, so no C compiler is needed:
    it checks that the sliced blocks and SLA trace; the GPU test runs Inductor)."""
    import torch._dynamo

    from turbowan.wan.compiled import compile_blocks

    cpu = torch.device("cpu")
    eager = load_transformer(demo_models["high"], cpu, torch.float32, attention="sla", activation_slices=2)
    compiled = load_transformer(demo_models["high"], cpu, torch.float32, attention="sla", activation_slices=2)
    torch._dynamo.reset()
    compile_blocks(compiled, backend="eager")
    counts = torch._dynamo.utils.counters
    counts.clear()
    expected = run_expert(eager, (2, 8, 12), 1)
    torch.testing.assert_close(run_expert(compiled, (2, 8, 12), 1), expected, rtol=0, atol=0)
    assert counts["stats"]["unique_graphs"] >= 1  # dynamo captured the blocks
    torch._dynamo.reset()


def test_compile_setting():
    from turbowan.wan.compiled import compile_wanted

    assert compile_wanted("auto", torch.device("cpu")) is False
    assert compile_wanted("auto", torch.device("cuda")) is True
    assert compile_wanted(True, torch.device("cpu")) is True
    assert compile_wanted("false", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="compile: 'sometimes'"):
        compile_wanted("sometimes", torch.device("cpu"))


def test_sliced_sla_blocks_give_the_same_output_a_slice_at_a_time(demo_models):
    """With SLA, activation_slices runs whole blocks in slices: the feed-forward and the q/k/v
    projections see a slice of the tokens, SLA a group of heads."""
    from turbowan.wan.slicing import SlicedBlock

    cpu = torch.device("cpu")
    whole = load_transformer(demo_models["high"], cpu, torch.float32, attention="sla", activation_slices=1)
    sliced = load_transformer(demo_models["high"], cpu, torch.float32, attention="sla", activation_slices=2)
    assert all(isinstance(block, SlicedBlock) for block in sliced.blocks)
    heads_seen, tokens_seen = [], []
    first = sliced.blocks[0].block
    first.attn1.sla.register_forward_hook(lambda _m, inputs, _out: heads_seen.append(inputs[0].shape[2]))
    first.ffn.register_forward_hook(lambda _m, inputs, _out: tokens_seen.append(inputs[0].shape[1]))
    size = (3, 16, 16)  # 3 x 8 x 8 = 192 tokens: several SLA key blocks
    expected = run_expert(whole, size, 2)
    torch.testing.assert_close(run_expert(sliced, size, 2), expected, rtol=1e-5, atol=1e-5)
    assert heads_seen == [1, 1]  # the demo expert's 2 heads, a group each
    assert tokens_seen == [96, 96]


def test_sla_over_groups_of_heads_gives_the_same_output(demo_models):
    """The processor runs SLA a group of heads at a time (less working memory): same output as one call."""
    from turbowan.wan.attention import SLAAttnProcessor

    cpu = torch.device("cpu")
    model = load_transformer(demo_models["high"], cpu, torch.float32, attention="sla", activation_slices=1)
    calls = []
    model.blocks[0].attn1.sla.register_forward_hook(lambda _m, inputs, _out: calls.append(inputs[0].shape[2]))
    outputs = {}
    for groups in (1, 4):
        for block in model.blocks:
            block.attn1.set_processor(SLAAttnProcessor(head_groups=groups))
        calls.clear()
        outputs[groups] = run_expert(model, (3, 16, 16), 6)
        assert calls == ([2] if groups == 1 else [1, 1])  # the demo expert's 2 heads
    torch.testing.assert_close(outputs[4], outputs[1], rtol=1e-5, atol=1e-5)
