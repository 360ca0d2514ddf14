"""LoRA pairs: the three file layouts, the merge (bf16 and int8 experts), the sheet's `loras` cells,
the plan made before any job, the worker's cache, and the artifacts a row's LoRAs give."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbowan.demo import DEMO_DIT, LORA_MODULES, dit_tensors, lora_tensors, make_lora
from turbowan.files.artifacts import load_artifact, read_record
from turbowan.files.formats import read_index
from turbowan.files.loras import LoraError, inspect_lora, lora_digest
from turbowan.loras import format_loras, grouped_positions, parse_loras_cell, plan_loras
from turbowan.sheet import Row, SheetError, load_schema, read_rows
from turbowan.stages import loading
from turbowan.stages.context import StageContext
from turbowan.stages.sampling import sample_high, sample_low
from turbowan.wan.int8 import dequantize_blockwise, quantize_blockwise, quantize_expert
from turbowan.wan.lora import check_lora, expert_shapes, lora_table, merge_lora, merged, pair_delta
from turbowan.wan.models import load_transformer
from turbowan.wan.sizes import latent_shape

from .conftest import REPO, make_workdir, snakemake, write_image

LAYOUTS = ("comfyui", "diffusers", "kohya")
# official module -> diffusers module, written out by hand (independently of the code under test)
DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
             "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
             "ffn.2": "ffn.net.2"}
VIDEO = {"width": 48, "height": 32, "num_frames": 9}
SAMPLING = {"seed": 7, "num_steps": 4, "sigma_max": 200.0, "boundary": 0.9, "ode": False}
CPU = torch.device("cpu")


def file_names(layout: str, block: int, module: str) -> tuple[str, str, str | None]:
    """(A, B, alpha) names of one module's pair in a layout, by hand."""
    if layout == "comfyui":
        stem = f"diffusion_model.blocks.{block}.{module}"
        return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", f"{stem}.alpha"
    if layout == "kohya":
        stem = f"lora_unet_blocks_{block}_{module.replace('.', '_')}"
        return f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"
    stem = f"transformer.blocks.{block}.{DIFFUSERS[module]}"
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", None


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """One LoRA per layout for the demo expert (rank 4; alpha 3 where the layout has one)."""
    folder = tmp_path_factory.mktemp("loras")
    paths = {}
    for number, layout in enumerate(LAYOUTS):
        paths[layout] = str(folder / f"{layout}.safetensors")
        make_lora(folder / f"{layout}.safetensors", 10 + number, layout, rank=4, alpha=3.0)
    return paths


@pytest.fixture(scope="module")
def plain_high(demo_models):
    return load_transformer(demo_models["high"], CPU).state_dict()


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_is_recognised_and_renamed_by_diffusers_converters(loras, demo_models, layout):
    info = inspect_lora(loras[layout])
    assert info.layout == layout
    table = lora_table(info)
    assert not table.deltas and not table.skipped
    got = {pair.target: (table.file_name(pair.down), table.file_name(pair.up), pair.alpha and
                         table.file_name(pair.alpha)) for pair in table.pairs}
    want = {f"blocks.{i}.{DIFFUSERS[m]}": file_names(layout, i, m)
            for i in range(DEMO_DIT["num_layers"]) for m in LORA_MODULES}
    assert got == want
    check_lora(loras[layout], expert_shapes(read_index(demo_models["high"])[1]), "high")  # fits


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_merged_weights_equal_the_hand_computed_merge(loras, demo_models, plain_high, layout, scale):
    merged_state = load_transformer(demo_models["high"], CPU, loras=[(loras[layout], scale)]).state_dict()
    raw = load_file(loras[layout])
    targets = set()
    for i in range(DEMO_DIT["num_layers"]):
        for module in LORA_MODULES:
            a_name, b_name, alpha_name = file_names(layout, i, module)
            a, b = raw[a_name], raw[b_name]
            rank = a.shape[0]
            alpha = raw[alpha_name].item() if alpha_name else rank  # diffusers: no alpha, alpha = rank
            key = f"blocks.{i}.{DIFFUSERS[module]}.weight"
            weight = plain_high[key]
            expected = (weight.float() + scale * alpha / rank * (b.float() @ a.float())).to(weight.dtype)
            assert torch.equal(merged_state[key], expected), key
            assert not torch.equal(merged_state[key], weight), key
            targets.add(key)
    for key, value in plain_high.items():  # nothing else changed
        if key not in targets:
            assert torch.equal(merged_state[key], value), key


def test_two_loras_merge_one_after_the_other(loras, demo_models, plain_high):
    both = load_transformer(demo_models["high"], CPU, loras=[(loras["comfyui"], 0.5), (loras["kohya"], -1.0)])
    key, (i, module) = "blocks.1.ffn.net.2.weight", (1, "ffn.2")
    weight = plain_high[key].float()
    for layout, scale in (("comfyui", 0.5), ("kohya", -1.0)):
        raw = load_file(loras[layout])
        a_name, b_name, alpha_name = file_names(layout, i, module)
        a, b = raw[a_name], raw[b_name]
        weight = (weight + scale * raw[alpha_name].item() / a.shape[0] * (b.float() @ a.float())).to(torch.bfloat16).float()
    assert torch.equal(both.state_dict()[key].float(), weight)


def test_diffusers_adapter_metadata_sets_alpha(tmp_path, demo_models, plain_high):
    tensors = lora_tensors(3, "diffusers", rank=4)
    path = tmp_path / "meta.safetensors"
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(
        {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"blocks.0.attn1.to_q": 2}})})
    state = load_transformer(demo_models["high"], CPU, loras=[(str(path), 1.0)]).state_dict()
    for key, alpha in (("blocks.0.attn1.to_q", 2), ("blocks.1.attn1.to_q", 8)):
        a, b = tensors[f"transformer.{key}.lora_A.weight"], tensors[f"transformer.{key}.lora_B.weight"]
        weight = plain_high[f"{key}.weight"]
        assert torch.equal(state[f"{key}.weight"], merged(weight, alpha / 4 * (b.float() @ a.float())))


def test_comfyui_full_deltas_and_image_branch(tmp_path, demo_models, plain_high, caplog):
    """ComfyUI's .diff (norms) and .diff_b (biases) add scale * delta; Wan2.1 I2V's CLIP image branch
    (k_img / v_img), which Wan2.2 has not, is skipped with a warning."""
    tensors = lora_tensors(4, "comfyui", rank=2)
    dim = DEMO_DIT["num_attention_heads"] * DEMO_DIT["attention_head_dim"]
    tensors["diffusion_model.blocks.0.norm3.diff"] = torch.randn(dim).to(torch.bfloat16)
    tensors["diffusion_model.blocks.1.self_attn.q.diff_b"] = torch.randn(dim).to(torch.bfloat16)
    for name in ("k_img", "v_img"):
        tensors[f"diffusion_model.blocks.0.cross_attn.{name}.lora_A.weight"] = torch.randn(2, 1280)
        tensors[f"diffusion_model.blocks.0.cross_attn.{name}.lora_B.weight"] = torch.randn(dim, 2)
    path = tmp_path / "extras.safetensors"
    save_file(tensors, str(path))
    table = lora_table(inspect_lora(path))
    assert sorted(d.target for d in table.deltas) == ["blocks.0.norm2.weight", "blocks.1.attn1.to_q.bias"]
    assert len(table.skipped) == 4
    with caplog.at_level("WARNING"):
        state = load_transformer(demo_models["high"], CPU, loras=[(str(path), 0.5)]).state_dict()
    assert "CLIP image branch skipped" in caplog.text
    for key, delta in (("blocks.0.norm2.weight", "diffusion_model.blocks.0.norm3.diff"),
                       ("blocks.1.attn1.to_q.bias", "diffusion_model.blocks.1.self_attn.q.diff_b")):
        assert torch.equal(state[key], merged(plain_high[key], 0.5 * tensors[delta].float()))


# --------------------------------------------------------------------------- LoRAs that do not fit


def test_a_lora_for_another_model_is_refused_naming_file_and_tensor(tmp_path, demo_models):
    wider = dict(DEMO_DIT, num_attention_heads=3)  # a 384-wide model's LoRA
    make_lora(tmp_path / "wide.safetensors", 1, "kohya", config=wider)
    shapes = expert_shapes(read_index(demo_models["high"])[1])
    message = (r"wide\.safetensors: does not fit .*tensor lora_unet_blocks_0_cross_attn_k\.lora_down\.weight is "
               r"\[4, 384\], but the expert .* has blocks\.0\.cross_attn\.k\.weight \[256, 256\]")
    with pytest.raises(LoraError, match=message):
        check_lora(tmp_path / "wide.safetensors", shapes, "high")
    with pytest.raises(LoraError, match=message):  # and at load, had it got that far
        load_transformer(demo_models["high"], CPU, loras=[(str(tmp_path / "wide.safetensors"), 1.0)])
    deeper = dict(DEMO_DIT, num_layers=3)
    make_lora(tmp_path / "deep.safetensors", 1, "comfyui", config=deeper)
    with pytest.raises(LoraError, match=r"deep\.safetensors: .*tensor diffusion_model\.blocks\.2\.cross_attn\.k\.lora_A"
                                        r"\.weight is for blocks\.2\.cross_attn\.k\.weight, which the expert"):
        check_lora(tmp_path / "deep.safetensors", shapes, "high")
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 8),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(8, 4)},
              str(tmp_path / "flux.safetensors"))
    with pytest.raises(LoraError, match=r"flux\.safetensors: not a LoRA for a Wan DiT .*double_blocks\.0\.img_attn"):
        check_lora(tmp_path / "flux.safetensors", shapes, "high")
    with pytest.raises(LoraError, match=r"high\.safetensors: not a LoRA \(it is a whole model"):
        inspect_lora(demo_models["high"])


# --------------------------------------------------------------------------- int8 experts


def test_int8_expert_is_merged_and_requantised_blockwise(tmp_path, loras):
    """Int8 layers: dequantise, merge in fp32, quantise again with the same 128x128 scheme."""
    path = tmp_path / "int8.safetensors"
    save_file({k: v.contiguous() for k, v in quantize_expert(dit_tensors(1)).items()}, str(path))
    plain = load_transformer(path, CPU, kernels=False).state_dict()
    state = load_transformer(path, CPU, kernels=False, loras=[(loras["comfyui"], 1.0)]).state_dict()
    raw = load_file(loras["comfyui"])
    for i in range(DEMO_DIT["num_layers"]):
        for module in LORA_MODULES:
            a_name, b_name, alpha_name = file_names("comfyui", i, module)
            a, b = raw[a_name], raw[b_name]
            prefix = f"blocks.{i}.{DIFFUSERS[module]}"
            exact = dequantize_blockwise(plain[f"{prefix}.int8_weight"], plain[f"{prefix}.scale"], torch.float32) \
                + 1.0 * raw[alpha_name].item() / a.shape[0] * (b.float() @ a.float())
            q, scale = quantize_blockwise(exact)
            assert torch.equal(state[f"{prefix}.int8_weight"], q), prefix
            assert torch.equal(state[f"{prefix}.scale"], scale), prefix


def test_int8_requantisation_error_is_that_of_int8_itself():
    """On an A14B-sized layer [5120, 5120] (bf16 weights of std 0.02, a rank-32 LoRA whose update is
    5% of the weight's norm): the requantised merge is 0.93% off the exact fp32 merge (relative
    Frobenius norm), as int8 quantisation of the layer itself is (0.94%); the largest error is 0.78%
    of the largest weight. Here on a smaller layer, same proportions."""
    torch.manual_seed(0)
    weight = (torch.randn(1024, 768) * 0.02).to(torch.bfloat16).float()
    q, scale = quantize_blockwise(weight)
    dequantized = dequantize_blockwise(q, scale, torch.float32)
    a, b = torch.randn(32, 768) / 768 ** 0.5, torch.randn(1024, 32)
    factor = float(0.05 * weight.norm() / (b @ a).norm())
    delta = pair_delta(a, b, factor, CPU)
    exact = dequantized + delta
    q2, scale2 = quantize_blockwise(exact)
    requantised = dequantize_blockwise(q2, scale2, torch.float32)
    requant_error = ((requantised - exact).norm() / exact.norm()).item()
    int8_error = ((dequantized - weight).norm() / weight.norm()).item()
    assert 0.005 < requant_error < 0.015 and 0.005 < int8_error < 0.015
    assert requant_error < 1.2 * int8_error
    # vs the merge the bf16 expert would get: both roundings together
    total = ((requantised - (weight + delta)).norm() / (weight + delta).norm()).item()
    assert total < 1.6 * int8_error
    # and why a scale of 0 merges nothing rather than requantising: that alone would move the weights
    q3, scale3 = quantize_blockwise(dequantized)
    assert not torch.equal(q3, q)


# --------------------------------------------------------------------------- artifacts, cache


@pytest.fixture(scope="module")
def conditions(demo_models, tmp_path_factory):
    from tests.conftest import prompt_sheet

    from turbowan.stages.conditioning import encode_image
    from turbowan.stages.prompt import encode_prompt

    folder = tmp_path_factory.mktemp("lora-cond")
    image = write_image(folder / "in.png", 60, 40, seed=3)
    text, cond = str(folder / "text.safetensors"), str(folder / "cond.safetensors")
    encode_prompt(*prompt_sheet(folder, "a red car, in the rain"), demo_models["text_encoder"],
                  demo_models["tokenizer"], text, "cpu")
    encode_image(str(image), demo_models["vae"], cond, VIDEO, "cpu")
    return text, cond


def run_row(folder, demo_models, conditions, loras_high=(), loras_low=(), ctx=None):
    text, cond = conditions
    folder.mkdir(exist_ok=True)
    boundary, latent = folder / "boundary.safetensors", folder / "latent.safetensors"
    high = {**SAMPLING, "loras": list(loras_high)} if loras_high else SAMPLING
    low = {**SAMPLING, "loras": list(loras_low)} if loras_low else SAMPLING
    sample_high(text, cond, demo_models["high"], str(boundary), high, VIDEO, "cpu", ctx=ctx)
    sample_low(text, cond, str(boundary), demo_models["low"], str(latent), low, VIDEO, "cpu", ctx=ctx)
    return boundary, latent


def test_scale_0_gives_artifacts_byte_identical_to_no_lora(tmp_path, demo_models, conditions, loras):
    # (one folder: the artifacts record their inputs' paths)
    plain = [p.read_bytes() for p in run_row(tmp_path / "row", demo_models, conditions)]
    lora = [{"name": "motion", "file": loras["comfyui"], "scale": 0.0}]
    zero = [p.read_bytes() for p in run_row(tmp_path / "row", demo_models, conditions, lora, lora)]
    assert zero == plain
    # ... and the merge itself at scale 0 changes no weight
    state = load_transformer(demo_models["high"], CPU).state_dict()
    before = {k: v.clone() for k, v in state.items()}
    assert merge_lora(state, lora_table(inspect_lora(loras["comfyui"])), 0.0) == 0
    assert all(torch.equal(state[k], before[k]) for k in before)
    table = lora_table(inspect_lora(loras["kohya"]))
    pair = table.pairs[0]
    weight = before[f"{pair.target}.weight"]
    raw = load_file(loras["kohya"])
    a, b = raw[table.file_name(pair.down)], raw[table.file_name(pair.up)]
    assert torch.equal(merged(weight, pair_delta(a, b, 0.0, CPU)), weight)


def test_artifacts_record_lora_digests_and_scales(tmp_path, demo_models, conditions, loras):
    plain = run_row(tmp_path / "plain", demo_models, conditions)
    high = [{"name": "motion", "file": loras["comfyui"], "scale": 0.8}]
    with_lora = run_row(tmp_path / "lora", demo_models, conditions, high)  # the low expert without
    record = read_record(with_lora[0])
    assert record["params"]["loras"] == [{"name": "motion", "file": loras["comfyui"], "scale": 0.8,
                                          "sha256": lora_digest(loras["comfyui"])}]
    assert "loras" not in read_record(with_lora[1])["params"]
    assert "loras" not in read_record(plain[0])["params"]
    x = {p: load_artifact(p, "sample_low", {"x": (latent_shape(**VIDEO), torch.float64)})[0]["x"]
         for p in (plain[1], with_lora[1])}
    assert not torch.equal(*x.values())  # the LoRA changed the video


def test_worker_cache_keys_differ_per_lora_set_and_one_merge_stays(tmp_path, demo_models, conditions, loras,
                                                                   monkeypatch):
    ctx = StageContext()
    loaded = []
    real = loading.load_transformer
    monkeypatch.setattr(loading, "load_transformer",
                        lambda path, *a, **k: loaded.append((path, tuple(k.get("loras", ())))) or real(path, *a, **k))

    def expert(lora_set):
        loading.expert(ctx, demo_models["high"], CPU, "bfloat16", "auto", 0.1, 1, False, lora_set)
        return list(ctx.models._models)

    keys = []
    for lora_set in ([], [(loras["comfyui"], 1.0)], [(loras["comfyui"], 0.5)], [(loras["kohya"], 0.5)],
                     [(loras["comfyui"], 0.5), (loras["kohya"], 0.5)], [(loras["comfyui"], 0.0)]):
        resident = expert(lora_set)
        assert len(resident) == 1  # one merge of the expert at a time
        keys.append(resident[0])
    assert len(set(keys[:5])) == 5  # a key per LoRA set
    assert keys[5] == keys[0]  # scale 0: the plain expert
    assert len(loaded) == 6
    expert([(loras["comfyui"], 0.0)])  # resident: no load
    assert len(loaded) == 6
    # a replaced file is a new key
    make_lora(tmp_path / "motion.safetensors", 1)
    first = expert([(str(tmp_path / "motion.safetensors"), 1.0)])
    make_lora(tmp_path / "motion.safetensors", 2)
    assert expert([(str(tmp_path / "motion.safetensors"), 1.0)]) != first
    # a worker never serves a row with another row's merge: rows through one context equal fresh ones
    lora = [{"name": "m", "file": loras["diffusers"], "scale": 1.0}]
    def outputs(folder, ctx_for):
        return [[p.read_bytes() for p in run_row(tmp_path / folder, demo_models, conditions, lora, lora, ctx=ctx_for())],
                [p.read_bytes() for p in run_row(tmp_path / f"{folder}-plain", demo_models, conditions, ctx=ctx_for())]]

    fresh = outputs("row", lambda: None)
    shared = StageContext()
    assert outputs("row", lambda: shared) == fresh


# --------------------------------------------------------------------------- sheet, config, order


def test_loras_cell():
    assert parse_loras_cell("") == ()
    assert parse_loras_cell("style:1; motion:0.8;") == (("motion", 0.8), ("style", 1.0))
    assert parse_loras_cell(" motion : -0.5 ") == (("motion", -0.5),)
    assert format_loras(parse_loras_cell("style:1;motion:0.8")) == "motion:0.8;style:1"
    for cell, reason in (("motion:fast", "the scale 'fast' is not a number"), ("motion", "has no scale"),
                         ("motion:", "the scale '' is not a number"), ("motion:nan", "not a finite number"),
                         ("mo tion:1", "a LoRA name is"), ("a:1;a:2", "named twice")):
        with pytest.raises(ValueError, match=re.escape(reason)):
            parse_loras_cell(cell)


def test_bad_loras_cells_are_refused_naming_row_and_column(tmp_path):
    write_image(tmp_path / "a.png", 32, 32)
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("id,image,prompt,loras\none,a.png,x,motion:1\ntwo,a.png,y,motion:fast\nthree,a.png,z,\n")
    defaults = {"seed": 0, "num_frames": 5, "resolution": "480p", "aspect_ratio": "1:1", "num_steps": 4,
                "sigma_max": 200, "boundary": 0.9, "ode": False, "width": 32, "height": 32}
    schema = load_schema(REPO / "config" / "schemas" / "sheet.schema.yaml")
    with pytest.raises(SheetError, match=r"row 2 \(line 3, id 'two'\), column 'loras': 'motion:fast': the scale "
                                         r"'fast' is not a number"):
        read_rows(sheet, defaults, schema)
    sheet.write_text("id,image,prompt,loras\none,a.png,x,motion:1\ntwo,a.png,y,motoin:1\nthree,a.png,z,\n")
    rows = read_rows(sheet, defaults, schema)
    assert [r.loras for r in rows] == [(("motion", 1.0),), (("motoin", 1.0),), ()]
    plan = plan_loras({"motion": {"high": "m.safetensors"}}, rows, str(sheet), {}, check=False)
    assert plan.problems == [f"{sheet}: row 2 (line 3, id 'two'), column 'loras': unknown LoRA 'motoin'; "
                             "the config's `loras` names: motion"]


def test_plan_sets_per_expert_scale_0_and_missing_files():
    rows = [Row("a", "i", "p", 0, 5, 32, 32, 4, 200.0, 0.9, False, loras=(("motion", 0.5), ("style", 1.0))),
            Row("b", "i", "p", 0, 5, 32, 32, 4, 200.0, 0.9, False, loras=(("motion", 0.0),)),
            Row("c", "i", "p", 0, 5, 32, 32, 4, 200.0, 0.9, False)]
    config = {"motion": {"high": "m_high.safetensors", "low": "m_low.safetensors"}, "style": {"low": "s.safetensors"}}
    plan = plan_loras(config, rows, "sheet.csv", {}, made_by_workflow=["m_high.safetensors"])
    assert plan.sets["a"] == {"high": [{"name": "motion", "file": "m_high.safetensors", "scale": 0.5}],
                              "low": [{"name": "motion", "file": "m_low.safetensors", "scale": 0.5},
                                      {"name": "style", "file": "s.safetensors", "scale": 1.0}]}
    assert plan.sets["b"] == plan.sets["c"] == {"high": [], "low": []}  # scale 0 is no LoRA
    assert plan.key("b", "high") == plan.key("c", "high") == ()
    assert plan.problems == ["loras.motion.low: m_low.safetensors does not exist",
                             "loras.style.low: s.safetensors does not exist"]  # the demo's may be made later


def test_plan_refuses_a_lora_that_does_not_fit_before_any_job(tmp_path, demo_models, loras):
    make_lora(tmp_path / "wide.safetensors", 1, config=dict(DEMO_DIT, ffn_dim=512))
    rows = [Row("a", "i", "p", 0, 5, 32, 32, 4, 200.0, 0.9, False, loras=(("ok", 1.0), ("wide", 1.0)))]
    config = {"ok": {"high": loras["kohya"]}, "wide": {"low": str(tmp_path / "wide.safetensors")}}
    plan = plan_loras(config, rows, "sheet.csv", {"high": demo_models["high"], "low": ["nope", demo_models["low"]]})
    assert len(plan.problems) == 1
    assert re.match(r"loras\.wide\.low: .*wide\.safetensors: does not fit .*tensor "
                    r"diffusion_model\.blocks\.0\.ffn\.0\.lora_B\.weight is \[512, 4\], but the expert models\.low "
                    r"\(.*low\.safetensors\) has blocks\.0\.ffn\.0\.weight \[256, 256\]", plan.problems[0])


def test_rows_with_one_lora_set_are_neighbours_within_each_wave():
    ids = [f"r{i}" for i in range(7)]
    assert grouped_positions(ids, lambda r: (), 3) == {r: i for i, r in enumerate(ids)}  # no LoRAs: sheet order
    sets = dict(r0="a", r1="b", r2="a", r3="c", r4="b", r5="a", r6="c")
    positions = grouped_positions(ids, sets.get, 3)
    order = sorted(ids, key=positions.get)
    assert order == ["r0", "r2", "r1",  # wave 1: a a b
                     "r4", "r3", "r5",  # wave 2 starts with b, where wave 1 ended
                     "r6"]
    assert sorted(positions.values()) == list(range(7))
    assert all(positions[r] // 3 == int(r[1:]) // 3 for r in ids)  # nobody changes wave


def test_gallery_shows_a_rows_loras_escaped(tmp_path):
    from turbowan.report.gallery import BatchInfo, _parameters

    row = Row("a", "i", "p", 0, 5, 32, 32, 4, 200.0, 0.9, False, loras=(("m<b>", 0.8), ("style", 1.0)))
    params = dict(_parameters(row, BatchInfo(results=str(tmp_path), fps=16)))
    assert params["LoRAs"] == "m<b>:0.8;style:1"
    from turbowan.report.gallery import _table

    assert "m&lt;b&gt;:0.8;style:1" in _table([("LoRAs", params["LoRAs"])])
    assert "LoRAs" not in dict(_parameters(Row("b", "i", "p", 0, 5, 32, 32, 4, 200.0, 0.9, False),
                                           BatchInfo(results=str(tmp_path), fps=16)))


# --------------------------------------------------------------------------- the workflow


LORA_SHEET = (
    "id,image,prompt,seed,num_frames,width,height,num_steps,loras\n"
    "boat,images/harbour.png,A boat,1,5,32,32,3,demo:1\n"
    "face,images/portrait.jpg,A face,2,5,32,32,3,\n"
    "kite,images/cafe.png,A kite,3,5,32,32,3,demo:1\n"
)


@pytest.mark.slow
def test_workflow_refuses_bad_cells_and_misfit_loras_before_any_job(tmp_path, demo_models):
    import yaml

    folder = make_workdir(tmp_path / "bad", LORA_SHEET.replace("kite,images/cafe.png,A kite,3,5,32,32,3,demo:1",
                                                               "kite,images/cafe.png,A kite,3,5,32,32,3,dmeo:1"))
    out = snakemake(folder, "-n", check=False)
    assert out.returncode != 0
    assert "row 3 (line 4, id 'kite'), column 'loras': unknown LoRA 'dmeo'" in out.stdout + out.stderr
    folder = make_workdir(tmp_path / "misfit", LORA_SHEET)
    make_lora(tmp_path / "wide.safetensors", 1, "kohya", config=dict(DEMO_DIT, num_attention_heads=4))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["models"] = dict(demo_models)  # (they exist: the LoRA is fitted against the expert now)
    config["loras"] = {"demo": {"high": str(tmp_path / "wide.safetensors")}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(folder, "-n", check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "loras.demo.high" in text and "wide.safetensors: does not fit" in text
    assert "tensor lora_unet_blocks_0_cross_attn_k.lora_down.weight is [4, 512]" in text
    assert not (folder / "results").exists()


@pytest.mark.slow
def test_workflow_with_loras_reruns_only_the_row_whose_scale_changed(tmp_path):
    from .conftest import jobs_run

    folder = make_workdir(tmp_path / "batch", LORA_SHEET)
    snakemake(folder)
    results = folder / "results"
    record = read_record(results / "boat" / "boundary.safetensors")
    assert [(r["name"], r["scale"]) for r in record["params"]["loras"]] == [("demo", 1.0)]
    assert record["params"]["loras"][0]["sha256"] == lora_digest(folder / "resources/demo-models/demo_lora_high.safetensors")
    assert "loras" not in read_record(results / "face" / "boundary.safetensors")["params"]
    # the sampling jobs ran the rows of one LoRA set together (boat and kite, then face): each expert
    # was loaded (merged) for boat, reused for kite, loaded plain for face
    for rule in ("sample_high", "sample_low"):
        loads = {row: (results / "logs" / rule / f"{row}.log").read_text().count("loading expert")
                 for row in ("boat", "face", "kite")}
        assert loads == {"boat": 1, "face": 1, "kite": 0}, (rule, loads)
    assert "merged LoRA" in (results / "logs" / "sample_high" / "boat.log").read_text()
    out = snakemake(folder, "-n")
    assert "Nothing to be done" in out.stdout + out.stderr
    (folder / "sheet.csv").write_text(LORA_SHEET.replace("A kite,3,5,32,32,3,demo:1", "A kite,3,5,32,32,3,demo:0.25"))
    out = snakemake(folder, "-n")
    jobs = re.findall(r"^ *rule (sample_high|sample_low|decode|encode_video|encode_image|encode_prompt):\n"
                      r"(?: +.*\n)*? +wildcards: id=(\S+)", out.stdout, re.M)
    assert sorted(set(jobs)) == [("decode", "kite"), ("encode_video", "kite"), ("sample_high", "kite"),
                                 ("sample_low", "kite")]
    assert "sample_high" in jobs_run(out.stdout)
    # a replaced LoRA file (new content) reruns the rows that use it (it is their input)
    (folder / "sheet.csv").write_text(LORA_SHEET)
    make_lora(folder / "resources/demo-models/demo_lora_high.safetensors", 99)
    out = snakemake(folder, "-n")
    jobs = re.findall(r"^ *rule (sample_high|sample_low):\n(?: +.*\n)*? +wildcards: id=(\S+)", out.stdout, re.M)
    assert sorted(set(jobs)) == [("sample_high", "boat"), ("sample_high", "kite"), ("sample_low", "boat"),
                                 ("sample_low", "kite")]
