"""Build the three networks from checkpoint files, streaming tensors straight to the device.

A loader recognises the file (turbowan.files.formats: layout and sizes from names, dtypes and shapes),
builds the diffusers / transformers module with empty (meta) parameters, then moves each tensor
from the file to the device one at a time: no whole-checkpoint copy in host memory, and only the
model a job asks for is ever loaded. Files may be safetensors (the pipeline's own, prepared by
prepare_models, or ComfyUI's) or `.pth` (memory-mapped, weights only); the pipeline converts
`.pth` files once, in prepare_models, so that expert jobs read safetensors.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open

from .attention import install_attention, resolve_attention
from ..files.formats import (
    KIND_WORDS,
    CheckpointError,
    ModelInfo,
    dit_model_config,
    inspect_model,
    load_pth,
    read_index,
)
from .compiled import compile_blocks
from .int8 import swap_in_int8_linears
from .lora import merge_loras
from ..files.safetensors_io import SafetensorsFile, SafetensorsFormatError
from .slicing import activation_slices_for, slice_activations
from .keymaps import SLA_MODULE, dit_rename_table, t5_key_to_hf, vae_rename_table
from ..progress import announce_load, took

log = logging.getLogger(__name__)

TEXT_LEN = 512
__all__ = ["CheckpointError", "load_transformer", "load_vae", "load_text_encoder", "load_tokenizer", "tensor_shapes"]


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a model file, without reading the tensors."""
    return {k: v.shape for k, v in read_index(path)[1].items()}


def _inspect(path: Path, kind: str) -> ModelInfo:
    info = inspect_model(path)
    if info.kind != kind:
        raise CheckpointError(f"{path}: is {KIND_WORDS[info.kind]} ({info.layout}); expected {KIND_WORDS[kind]}")
    return info


@contextmanager
def _open_tensors(
    info: ModelInfo, names: list[str], device: torch.device
) -> Iterator[tuple[Callable[[str], torch.Tensor], Iterator[tuple[str, torch.Tensor]]]]:
    """(get, arriving): get(file key) -> a CPU tensor; arriving yields (file key, tensor) for each of
    `names`. A .pth: from its memory map. A safetensors file to a CUDA device: SafetensorsFile's
    pinned read-ahead (tensors arrive on the device, in the file's order); elsewhere (the CPU):
    safetensors' own reader with the pread backend, in the file's order (each tensor in memory of
    its own, nothing of the file left mapped)."""
    if info.container == "pth":
        tensors = load_pth(info.path)
        yield tensors.__getitem__, ((key, tensors[key]) for key in names)
        del tensors
        return
    try:
        if device.type == "cuda":
            with SafetensorsFile(info.path) as f:
                yield f.get_tensor, f.to_device(names, device)
        else:
            with safe_open(str(info.path), framework="pt", backend="pread") as f:
                order = {key: i for i, key in enumerate(f.offset_keys())}
                yield f.get_tensor, ((key, f.get_tensor(key)) for key in sorted(set(names), key=order.__getitem__))
    except (SafetensorsFormatError, SafetensorError) as err:
        raise CheckpointError(f"{info.path}: broken safetensors file ({err})") from err


def _stream_state_dict(
    info: ModelInfo,
    table: dict[str, str],
    device: torch.device,
    dtype_for: Callable[[str, torch.Tensor], torch.dtype],
    transform: Callable[[str, torch.Tensor, Callable], torch.Tensor] | None = None,
    stop: threading.Event | None = None,
) -> dict[str, torch.Tensor]:
    """{module key: tensor on device}, reading each tensor once, straight from the file to the device
    (dtype conversions and reshapes happen there). Setting `stop` ends it early (the result is then
    partial and thrown away)."""
    state = {}
    new_keys: dict[str, list[str]] = {}  # file key -> the module keys it fills
    for new_key, file_key in table.items():
        new_keys.setdefault(file_key, []).append(new_key)
    with _open_tensors(info, list(new_keys), device) as (get, arriving):
        for file_key, tensor in arriving:
            if stop is not None and stop.is_set():
                break
            if transform is not None:
                tensor = transform(file_key, tensor, get)
            for new_key in new_keys[file_key]:
                state[new_key] = tensor.to(device=device, dtype=dtype_for(new_key, tensor), non_blocking=True)
    return state


# Python's GIL switch interval while a stream runs beside an import (default 5 ms): the stream
# thread waits for the GIL after each read and copy, and the import would hold it that long. Whether
# the shorter interval helps is not settled: GPU measurements went both ways (BENCHMARKS.md,
# session 4, "Not shown either way").
STREAM_SWITCH_INTERVAL_S = 0.001


@contextmanager
def _streaming(info: ModelInfo, table: dict[str, str], device: torch.device, dtype_for, transform=None):
    """Stream the file's tensors to the device in a background thread while the caller imports
    diffusers or transformers and builds the empty network: the imports take seconds in every job,
    and so does reading a 28.6 GB expert even from the page cache, so the two overlap (BENCHMARKS.md).
    Yields a function that waits for the state dict; if the caller fails first, the stream stops.
    The two share Python's GIL (STREAM_SWITCH_INTERVAL_S)."""
    stop = threading.Event()
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(STREAM_SWITCH_INTERVAL_S)
    if device.type == "cuda" and device.index is None:  # the caller's card: a new thread starts on card 0
        device = torch.device("cuda", torch.cuda.current_device())

    started = time.perf_counter()
    streamed_in = []

    def stream() -> dict[str, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        state = _stream_state_dict(info, table, device, dtype_for, transform, stop)
        streamed_in.append(time.perf_counter() - started)
        return state

    def wait() -> dict[str, torch.Tensor]:
        built_in = time.perf_counter() - started
        state = future.result()
        log.info("%s: network built in %.1f s, weights streamed in %.1f s, side by side", info.path.name,
                 built_in, streamed_in[0])
        return state

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream") as pool:
            future = pool.submit(stream)
            try:
                yield wait
            except BaseException:
                stop.set()
                raise
    finally:
        sys.setswitchinterval(switch_interval)


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: does not fit the network; missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


# --------------------------------------------------------------------------- the DiT experts


# The expert's modules kept in float32: diffusers' WanTransformer3DModel._keep_in_fp32_modules
# (time embedder, norms, modulation tables) and SLA's proj_l (docs/reference.md, "Mapping onto
# diffusers and transformers"). Written out so that the weights can stream in their final dtypes
# while diffusers is still being imported; a test holds it equal to diffusers' list.
DIT_FP32_MODULES = frozenset({"rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "proj_l"})


def load_transformer(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    attention: str = "auto",
    sla_topk: float = 0.1,
    kernels: bool = True,
    activation_slices: int | str = "auto",
    compile: bool = False,
    loras: Sequence[tuple[str, float]] = (),
):
    """A Wan2.2 expert (bf16 or int8, with or without SLA weights) as diffusers' WanTransformer3DModel.

    Weights go to `dtype` except DIT_FP32_MODULES, which stay float32; int8 layers keep their int8
    weights and float32 scales (turbowan.wan.int8). `attention`: auto | sla | sagesla | sdpa
    (turbowan.wan.attention). kernels=False: plain-torch SLA and int8 even on a GPU with turbodiffusion
    (for comparisons). activation_slices: see activation_slices_for. compile: see turbowan.wan.compiled.
    loras: (LoRA file, scale) pairs merged into the weights as they load, in this order
    (turbowan.wan.lora; int8 layers are requantised).
    """
    path = Path(path)
    started = announce_load(log, "expert", path, device)
    info = _inspect(path, "dit")
    config = dit_model_config(info)
    table = dit_rename_table(info.index)
    int8_modules = sorted(k[: -len(".int8_weight")] for k in table if k.endswith(".int8_weight"))
    int8_set = set(int8_modules)

    def dtype_for(key: str, tensor: torch.Tensor) -> torch.dtype:
        module, _, name = key.rpartition(".")
        if module in int8_set and name in ("int8_weight", "scale"):
            return tensor.dtype  # int8 weights and float32 scales stay as stored
        return torch.float32 if DIT_FP32_MODULES & set(key.split(".")) else dtype

    def transform(file_key: str, tensor: torch.Tensor, _get) -> torch.Tensor:
        if file_key.endswith("patch_embedding.weight") and tensor.dim() == 2:
            # TurboDiffusion stores the patch embedding as a Linear [dim, in*1*2*2]; diffusers has a Conv3d.
            return tensor.reshape(tensor.shape[0], config["in_channels"], 1, 2, 2)
        return tensor

    with _streaming(info, table, device, dtype_for, transform) as streamed:
        from diffusers import WanTransformer3DModel

        mode, implementation = resolve_attention(attention, info.sla, device, str(path), kernels)
        with init_empty_weights(include_buffers=False):
            model = WanTransformer3DModel(**config)
        int8_backend = swap_in_int8_linears(model, int8_modules, device, dtype, kernels) if int8_modules else None
        install_attention(model, mode, implementation, sla_topk)
        state = streamed()
    if mode == "sdpa":
        state = {k: v for k, v in state.items() if f".{SLA_MODULE}." not in k}
    if loras:
        merge_loras(state, loras, path, int8_set)
    _assign(model, state, path)
    slices = activation_slices_for(activation_slices, device)
    slice_activations(model, slices)
    model.to(device).eval().requires_grad_(False)
    if compile:
        compile_blocks(model)
    log.info(
        "loaded expert %s: %s; attention %s (%s, topk %s)%s%s%s in %s",
        path, info.describe(), mode, implementation, sla_topk,
        f"; int8 linears via {int8_backend}" if int8_backend else "",
        f"; blocks in {slices} slices (tokens; SLA by heads)" if slices > 1 else "",
        "; blocks compiled (torch.compile, on first use)" if compile else "", took(path, started),
    )
    model.kernels_fallback = _kernels_fallback(device, kernels, implementation, int8_backend)
    if mode == "sdpa" and info.sla:
        log.warning("%s carries SLA weights, but attention is sdpa: the SLA linear branch is dropped", path)
    return model


def _kernels_fallback(device: torch.device, kernels: bool, implementation: str, int8_backend: str | None) -> str:
    """Why a GPU expert runs plain-torch SLA or int8 where TurboDiffusion's kernels would be faster
    ("" when it does not): the sampling stages log it for every row, and the summary shows it."""
    if device.type != "cuda" or not kernels:
        return ""
    why = []
    if implementation == "plain torch SLA":
        why.append("SLA attention: turbodiffusion.SLA not importable")
    if int8_backend == "torch":
        why.append("int8 linears: turbodiffusion.ops not importable")
    return "; ".join(why)


# --------------------------------------------------------------------------- the VAE


def load_vae(path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
    """The Wan2.1 VAE (.pth or ComfyUI safetensors: same names) as diffusers' AutoencoderKLWan."""
    path = Path(path)
    started = announce_load(log, "VAE", path, device)
    info = _inspect(path, "vae")
    with _streaming(info, vae_rename_table(info.index), device, lambda _k, _t: dtype) as streamed:
        from diffusers import AutoencoderKLWan

        with init_empty_weights(include_buffers=False):
            model = AutoencoderKLWan(**info.config)
        state = streamed()
    _assign(model, state, path)
    model.to(device).eval().requires_grad_(False)
    log.info("loaded VAE %s: %s in %s", path, info.describe(), took(path, started))
    return model


# --------------------------------------------------------------------------- umT5 + tokenizer


def t5_config(info: ModelInfo):
    from transformers import UMT5Config

    return UMT5Config(
        **info.config,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )


def _t5_table(info: ModelInfo, keys) -> dict[str, str]:
    """{UMT5EncoderModel key: file key} for the official, HF and ComfyUI fp8 layouts."""
    if info.layout == "umt5-official":
        table = {t5_key_to_hf(k): k for k in keys}
        table["encoder.embed_tokens.weight"] = "token_embedding.weight"
        return table
    table = {k: k for k in keys if k == "shared.weight" or (
        k.startswith("encoder.") and not k.endswith((".scale_weight", ".scale_input")))}
    embed = "shared.weight" if "shared.weight" in keys else "encoder.embed_tokens.weight"
    table["shared.weight"] = table["encoder.embed_tokens.weight"] = embed
    return table


def _dequantize_fp8(file_key: str, tensor: torch.Tensor, get) -> torch.Tensor:
    """ComfyUI's scaled fp8: W = weight (float8_e4m3fn) * scale_weight (float32), in float32."""
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale = get(file_key[: -len("weight")] + "scale_weight")
        return tensor.float() * scale.float().reshape(())
    return tensor


def load_text_encoder(path: str | Path, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """The umT5-XXL encoder (official, HF or ComfyUI fp8-scaled names) as transformers' UMT5EncoderModel."""
    path = Path(path)
    started = announce_load(log, "text encoder", path, device)
    info = _inspect(path, "text_encoder")
    table = _t5_table(info, info.index)
    with _streaming(info, table, device, lambda _k, _t: dtype, _dequantize_fp8) as streamed:
        from transformers import UMT5EncoderModel

        with init_empty_weights(include_buffers=False):
            model = UMT5EncoderModel(t5_config(info))
        state = streamed()
    _assign(model, state, path)
    model.to(device).eval().requires_grad_(False)
    log.info("loaded text encoder %s: %s in %s", path, info.describe(), took(path, started))
    return model


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: tokenizer folder not found (the google/umt5-xxl tokenizer files)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
