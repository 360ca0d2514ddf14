"""Tiny random-weight models of the real architectures, saved in the real checkpoint layouts.

Nothing can be downloaded here, and the demo must run on a CPU in minutes, so the built-in demo
uses these: the Wan2.2 DiT (128-wide heads like the real one, but 2 heads and 2 layers), the Wan2.1
VAE (its real block structure, 8 base channels instead of 96), the umT5 encoder (2 layers, width
32) and a small tokenizer built offline. The files use the official key names, so the loaders
the demo exercises are the ones real checkpoints go through, and the experts carry SLA `proj_l`
weights like TurboDiffusion's. The videos they make are noise. A tiny LoRA pair (ComfyUI's layout)
goes with them, for the demo row that uses one.

`write_official_pth` re-saves a demo file as a `.pth` the way the official tools do (for the DiT:
a `net.` prefix and `_checkpoint_wrapped_module.` pieces), to exercise prepare_models.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from .files.artifacts import atomic_path
from .wan.keymaps import dit_key_to_official, t5_key_to_official, vae_key_to_official

DEMO_DIT = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=32, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
)
DEMO_VAE = dict(base_dim=8, z_dim=16)
DEMO_T5 = dict(
    vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
)
DEMO_WORDS = (
    "a the of and in on with at to is cat dog car city sea sky sun light night street rain snow "
    "walks runs flies slowly camera moves over under bright dark red blue green old new small big"
).split()


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def dit_tensors(seed: int, config: dict | None = None, sla: bool = True) -> dict[str, torch.Tensor]:
    """A random expert's tensors in TurboDiffusion's layout: official names, bf16, patch_embedding as
    a Linear [dim, 144], and (sla=True) SLA's proj_l [128, 128] + bias in every block."""
    from diffusers import WanTransformer3DModel

    config = config or DEMO_DIT
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config)
    tensors = {}
    for key, value in model.state_dict().items():
        if key == "patch_embedding.weight":
            value = value.reshape(value.shape[0], -1)  # [dim, 36*1*2*2], as TurboDiffusion stores it
        tensors[dit_key_to_official(key)] = value.to(torch.bfloat16)
    if sla:
        head_dim = config["attention_head_dim"]
        for i in range(config["num_layers"]):
            proj = torch.nn.Linear(head_dim, head_dim)  # trained proj_l are not zero: random, like the rest
            prefix = f"blocks.{i}.self_attn.attn_op.local_attn.proj_l"
            tensors[f"{prefix}.weight"] = proj.weight.detach().to(torch.bfloat16)
            tensors[f"{prefix}.bias"] = proj.bias.detach().to(torch.bfloat16)
    return tensors


def make_dit(path: Path, seed: int) -> None:
    """A demo expert (SLA weights included), saved as safetensors in the official layout."""
    _save(dit_tensors(seed), path)


def _official_pth_key(key: str) -> str:
    """DiT key as TurboDiffusion's training checkpoints write it: net.blocks.N._checkpoint_wrapped_module.*"""
    parts = key.split(".")
    if parts[0] == "blocks":
        parts.insert(2, "_checkpoint_wrapped_module")
    return "net." + ".".join(parts)


def write_official_pth(source: str | Path, out: str | Path, dit_wrappers: bool | None = None) -> None:
    """Re-save a safetensors model file as a .pth state dict (torch.save), same tensors and dtypes.

    A DiT gets the `net.` / `_checkpoint_wrapped_module.` wrappers unless dit_wrappers=False.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(source))
    is_dit = "patch_embedding.weight" in tensors
    if is_dit and dit_wrappers is not False:
        tensors = {_official_pth_key(k): v for k, v in tensors.items()}
    with atomic_path(out) as tmp:
        torch.save(tensors, str(tmp))


def make_vae(path: Path, seed: int) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(**DEMO_VAE)
    _save({vae_key_to_official(k): v.float() for k, v in model.state_dict().items()}, path)


def make_text_encoder(path: Path, seed: int) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**DEMO_T5))
    tensors = {}
    for key, value in model.state_dict().items():
        tensors[t5_key_to_official(key)] = value.to(torch.bfloat16)  # embed_tokens and shared are one
    _save(tensors, path)


def make_tokenizer(folder: Path) -> None:
    """A Unigram tokenizer with umT5's special ids (pad 0, eos 1, unk 2), built without a download."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"]
    pieces += ["\u2581" + w for w in DEMO_WORDS]
    pieces += list(string.ascii_letters + string.digits + string.punctuation)
    pieces = pieces[: DEMO_T5["vocab_size"]]
    vocab = [(p, 0.0 if i < 3 else -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))


# The Linear layers of an expert block a Wan LoRA trains (official names).
LORA_MODULES = tuple(f"{attn}.{p}" for attn in ("self_attn", "cross_attn") for p in "qkvo") + ("ffn.0", "ffn.2")


def _lora_module_shape(module: str, config: dict) -> tuple[int, int]:
    """[out, in] of a block Linear."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    return {"ffn.0": (config["ffn_dim"], dim), "ffn.2": (dim, config["ffn_dim"])}.get(module, (dim, dim))


def lora_tensors(seed: int, layout: str = "comfyui", rank: int = 4, alpha: float | None = 2.0,
                 config: dict | None = None, std: float = 0.05) -> dict[str, torch.Tensor]:
    """A random LoRA for every block Linear of an expert (`config`: DEMO_DIT), in one of the layouts
    (turbowan.files.loras): comfyui (diffusion_model.blocks.N.self_attn.q.lora_A.weight + .alpha),
    diffusers (transformer.blocks.N.attn1.to_q.lora_A.weight; no alpha: alpha = rank) or kohya
    (lora_unet_blocks_N_self_attn_q.lora_down.weight + .alpha). bf16, as trainers save them."""
    from .wan.keymaps import dit_key_to_diffusers

    config = config or DEMO_DIT
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(config["num_layers"]):
        for module in LORA_MODULES:
            out_f, in_f = _lora_module_shape(module, config)
            down = (torch.randn(rank, in_f, generator=generator) * std).to(torch.bfloat16)
            up = (torch.randn(out_f, rank, generator=generator) * std).to(torch.bfloat16)
            official = f"blocks.{i}.{module}"
            if layout == "comfyui":
                names = (f"diffusion_model.{official}.lora_A.weight", f"diffusion_model.{official}.lora_B.weight",
                         f"diffusion_model.{official}.alpha")
            elif layout == "kohya":
                stem = "lora_unet_" + official.replace(".", "_")
                names = (f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha")
            elif layout == "diffusers":
                stem = "transformer." + dit_key_to_diffusers(f"{official}.weight").removesuffix(".weight")
                names = (f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", None)
            else:
                raise ValueError(f"unknown LoRA layout {layout!r}")
            tensors[names[0]], tensors[names[1]] = down, up
            if names[2] is not None and alpha is not None:
                tensors[names[2]] = torch.tensor(float(alpha))
    return tensors


def make_lora(path: Path, seed: int, layout: str = "comfyui", **kwargs) -> None:
    _save(lora_tensors(seed, layout, **kwargs), path)


def make_demo_models(high: str, low: str, vae: str, text_encoder: str, tokenizer: str, seed: int = 0,
                     lora_high: str | None = None, lora_low: str | None = None) -> None:
    """All demo model files, deterministic for a given seed; with lora_high / lora_low, the demo's
    LoRA pair too (ComfyUI's layout, rank 4, alpha 2)."""
    make_dit(Path(high), seed + 1)
    make_dit(Path(low), seed + 2)
    make_vae(Path(vae), seed + 3)
    make_text_encoder(Path(text_encoder), seed + 4)
    make_tokenizer(Path(tokenizer))
    if lora_high:
        make_lora(Path(lora_high), seed + 5)
    if lora_low:
        make_lora(Path(lora_low), seed + 6)
