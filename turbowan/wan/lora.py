"""LoRAs for the Wan DiT experts: their names as the expert's (diffusers') modules, the fit, the merge.

Names. turbowan.files.loras tells a file's layout (ComfyUI, diffusers / PEFT, kohya / musubi) from
its tensor names. The LoRA pairs are renamed by diffusers' own Wan converters
(`WanLoraLoaderMixin.lora_state_dict`, which calls `_convert_non_diffusers_wan_lora_to_diffusers` or
`_convert_musubi_wan_lora_to_diffusers`), run on stand-in tensors on the meta device whose sizes
number the file's tensors: the result is a rename table {diffusers name: file name} made without
reading any data. The converters would fold alpha / rank into the tensors; alpha is applied here
instead, by the file's own names, so the merge is exactly the formula below. ComfyUI's full deltas
(`.diff` for weights such as norms, `.diff_b` for biases) carry official Wan names and go through
the expert's own official -> diffusers names (turbowan.wan.keymaps).

Fit. Every pair must target a module the expert has, with A [rank, in] and B [out, rank] fitting its
weight [out, in]; every delta must have its target's shape. Otherwise LoraError names the file and
the first tensor (in the file's order) that does not fit: a LoRA for another model (Wan2.1 1.3B,
Wan2.2 5B, another family) is refused before any job (rules/common.smk) and again at load. The one
exception: Wan2.1 I2V's CLIP image branch (`k_img`, `v_img`, `img_emb`), which Wan2.2's experts do
not have, is skipped with a warning, as other tools do, so Wan2.1 I2V LoRAs still apply to the rest.

Merge. As the expert loads, into its state dict before it is assigned (turbowan.wan.models), so a
step costs what it costs without a LoRA: for each LoRA of the row, in order,

    W <- to_dtype( fp32(W) + (scale * alpha / rank) * (fp32(B) @ fp32(A)) )
    b <- to_dtype( fp32(b) + scale * diff_b ),   W <- to_dtype( fp32(W) + scale * diff )

with alpha = rank when the file has none (diffusers' convention; a diffusers file's
`lora_adapter_metadata` may set it). Int8 layers (TurboDiffusion's 128x128 blockwise format) are
dequantised to fp32, merged, and quantised again with the same scheme (turbowan.wan.int8.
quantize_blockwise): new block scales from the merged weights. The requantised weights differ from
the exact merge by the int8 rounding of the new blocks, the same order as the original
quantisation's error (tests/test_lora.py measures both). A scale of 0 merges nothing: the expert is
bit for bit the one without the LoRA.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from ..files.formats import TensorInfo, load_pth
from ..files.loras import DIFF_SUFFIXES, LoraError, LoraInfo, inspect_lora
from .keymaps import dit_key_to_diffusers, dit_key_to_official, dit_rename_table

log = logging.getLogger(__name__)

# Wan2.1 I2V's CLIP image branch, in diffusers' names: Wan2.2's experts have no such modules.
IMAGE_BRANCH = re.compile(r"\.(add_k_proj|add_v_proj|norm_added_k)$|^condition_embedder\.image_embedder\.")
_DOWN = (".lora_A.weight", ".lora_down.weight")


@dataclass(frozen=True)
class Pair:
    """One low-rank update: target module (diffusers name) <- A, B (canonical file names), alpha."""

    target: str  # e.g. blocks.0.attn1.to_q
    down: str  # A [rank, in]
    up: str  # B [out, rank]
    alpha: str | None  # the file's alpha scalar for this module, if it has one


@dataclass(frozen=True)
class Delta:
    """A full delta: target tensor (diffusers name) <- a tensor of its shape (canonical file name)."""

    target: str  # e.g. blocks.0.norm2.weight, blocks.0.attn1.to_q.bias
    source: str


@dataclass
class LoraTable:
    info: LoraInfo
    pairs: list[Pair] = field(default_factory=list)
    deltas: list[Delta] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # canonical names not applied (CLIP image branch)

    def file_name(self, canonical: str) -> str:
        return self.info.names[canonical]


# --------------------------------------------------------------------------- names


def diffusers_names(keys: Sequence[str]) -> dict[str, str]:
    """{diffusers name (no `transformer.` prefix): canonical file name} for LoRA tensors in one of
    the layouts, by diffusers' own converters run on numbered stand-ins (no tensor data)."""
    import torch
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    stand_ins = {}
    for number, key in enumerate(keys, start=1):
        # alpha values are read (.item()) but only scale the stand-ins; sizes number the rest
        stand_ins[key] = torch.tensor(1.0) if key.endswith(".alpha") else torch.empty(number, device="meta")
    converted = WanLoraLoaderMixin.lora_state_dict(stand_ins)
    table = {}
    for name, tensor in converted.items():
        if tensor.device.type == "meta" and tensor.dim() == 1:
            table[name.removeprefix("transformer.")] = keys[tensor.shape[0] - 1]
    return table


# official Wan modules a LoRA can train (only used to name the tensor of a file that is not a Wan LoRA)
_WAN_MODULE = re.compile(
    r"blocks[._]\d+[._](self_attn|cross_attn)[._](q|k|v|o|k_img|v_img|norm_q|norm_k|norm_k_img)\b"
    r"|blocks[._]\d+[._](ffn[._][02]|norm3|modulation)\b|^(head[._]head|time_projection[._]1|"
    r"(text|time)_embedding[._][02]|img_emb[._]proj[._][0-4]|head[._]modulation)\b"
)


def _first_foreign(info: LoraInfo, keys: Iterable[str]) -> str | None:
    for key in keys:
        bare = re.sub(r"^(diffusion_model\.|lora_unet_|transformer\.)", "", key)
        if info.layout == "diffusers":
            bare = dit_key_to_official(bare.split(".lora_")[0].removesuffix(".alpha") + ".weight")
        if not _WAN_MODULE.search(bare):
            return info.names[key]
    return None


def _module_of(canonical: str) -> str:
    for suffix in _DOWN:
        if canonical.endswith(suffix):
            return canonical[: -len(suffix)]
    raise ValueError(canonical)


def lora_table(info: LoraInfo) -> LoraTable:
    """The pairs and deltas of a recognised LoRA file, in the expert's names (LoraError if the names
    are not a Wan DiT's)."""
    table = LoraTable(info)
    names = list(info.names)
    diffs = [k for k in names if k.endswith(DIFF_SUFFIXES)]
    alphas = [k for k in names if k.endswith(".alpha")]
    pairs = [k for k in names if not k.endswith(DIFF_SUFFIXES + (".alpha",))]
    if diffs and info.layout != "comfyui":
        raise LoraError(f"{info.path}: tensor {table.file_name(diffs[0])}: full deltas (.diff, .diff_b) are "
                        f"only known in ComfyUI's layout, this file is {info.layout}'s")
    # musubi's converter needs every alpha; ComfyUI's and diffusers' alphas are read here by name
    converted: dict[str, str] = {}
    if pairs:
        to_convert = pairs + alphas if info.layout == "kohya" else pairs
        try:
            converted = diffusers_names(to_convert)
        except (ValueError, KeyError, IndexError, RuntimeError, TypeError) as err:
            foreign = _first_foreign(info, pairs)
            what = f"tensor {foreign} is not a Wan DiT module's" if foreign else f"diffusers' converter: {err!r}"
            raise LoraError(f"{info.path}: not a LoRA for a Wan DiT in {info.layout}'s layout ({what})") from None
    used = set(converted.values())
    left = [k for k in pairs if k not in used]
    if left:
        raise LoraError(f"{info.path}: tensor {table.file_name(left[0])} is not one diffusers' Wan LoRA converter "
                        "knows (a LoRA for another model?)")
    order = {name: i for i, name in enumerate(names)}
    for name, canonical in sorted(converted.items(), key=lambda item: order[item[1]]):
        if name.endswith(".lora_A.weight"):
            target = name[: -len(".lora_A.weight")]
            up = converted.get(f"{target}.lora_B.weight")
            if up is None:
                raise LoraError(f"{info.path}: tensor {table.file_name(canonical)} has no lora_B / lora_up partner")
            alpha = _module_of(canonical) + ".alpha"
            pair = Pair(target, canonical, up, alpha if alpha in info.names else None)
            if IMAGE_BRANCH.search(target):
                table.skipped += [canonical, up]
            else:
                table.pairs.append(pair)
        elif name.endswith(".lora_B.bias"):  # ComfyUI's diff_b, as diffusers names it
            module = name[: -len(".lora_B.bias")]
            if IMAGE_BRANCH.search(module):
                table.skipped.append(canonical)
            else:
                table.deltas.append(Delta(f"{module}.bias", canonical))
        elif name.endswith(".lora_B.weight"):
            if f"{name[: -len('.lora_B.weight')]}.lora_A.weight" not in converted:
                raise LoraError(f"{info.path}: tensor {table.file_name(canonical)} has no lora_A / lora_down partner")
        elif not name.endswith(".alpha"):
            raise LoraError(f"{info.path}: tensor {table.file_name(canonical)} (as {name}) is not a LoRA pair")
    for canonical in diffs:
        official = canonical.removeprefix("diffusion_model.")
        official = official[: -len(".diff_b")] + ".bias" if official.endswith(".diff_b") else \
            official[: -len(".diff")] + ".weight"
        target = dit_key_to_diffusers(official)
        if IMAGE_BRANCH.search(target.rsplit(".", 1)[0]) or official.startswith("img_emb."):
            table.skipped.append(canonical)
        else:
            table.deltas.append(Delta(target, canonical))
    return table


# --------------------------------------------------------------------------- fit


def expert_shapes(index: Mapping[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    """{diffusers tensor name: shape} of an expert file's index (official names, int8 layers as
    their `.weight`), for checking LoRAs against it without loading it."""
    table = dit_rename_table(index)
    shapes = {}
    for new, old in table.items():
        if new.endswith(".int8_weight"):
            shapes[new[: -len("int8_weight")] + "weight"] = index[old].shape
        elif not (new.endswith(".scale") and new[: -len("scale")] + "int8_weight" in table):
            shapes[new] = index[old].shape
    return shapes


def state_shapes(state: Mapping[str, "torch.Tensor"]) -> dict[str, tuple[int, ...]]:  # noqa: F821
    """The same for a loaded state dict (diffusers names; int8 layers by their int8_weight)."""
    shapes = {}
    for key, tensor in state.items():
        if key.endswith(".int8_weight"):
            shapes[key[: -len("int8_weight")] + "weight"] = tuple(tensor.shape)
        elif not (key.endswith(".scale") and key[: -len("scale")] + "int8_weight" in state):
            shapes[key] = tuple(tensor.shape)
    return shapes


def fit_problem(table: LoraTable, shapes: Mapping[str, tuple[int, ...]], expert: str | Path) -> str | None:
    """Why the LoRA does not fit the expert, naming the first tensor (in the file's order), or None."""
    info = table.info
    order = {name: i for i, name in enumerate(info.names)}

    def official(target: str) -> str:
        return dit_key_to_official(target)

    problems: list[tuple[int, str]] = []
    for pair in table.pairs:
        a, b, weight = info.shape(pair.down), info.shape(pair.up), shapes.get(f"{pair.target}.weight")
        first = min(order[pair.down], order[pair.up])
        if weight is None:
            problems.append((first, f"tensor {table.file_name(pair.down)} is for {official(pair.target + '.weight')}, "
                                    f"which the expert {expert} does not have"))
            continue
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            problems.append((first, f"tensors {table.file_name(pair.down)} {list(a)} and {table.file_name(pair.up)} "
                                    f"{list(b)} are not a LoRA pair (A [rank, in], B [out, rank])"))
            continue
        for name, got, want in ((pair.down, a[1], weight[1]), (pair.up, b[0], weight[0])):
            if got != want or len(weight) != 2:
                problems.append((order[name], f"tensor {table.file_name(name)} is {list(info.shape(name))}, but the "
                                              f"expert {expert} has {official(pair.target + '.weight')} "
                                              f"{list(weight)}"))
                break
        if pair.alpha is not None and _numel(info.shape(pair.alpha)) != 1:
            problems.append((order[pair.alpha], f"tensor {table.file_name(pair.alpha)} is {list(info.shape(pair.alpha))}; "
                                                "an alpha is one number"))
    for delta in table.deltas:
        target = shapes.get(delta.target)
        got = info.shape(delta.source)
        if target is None:
            problems.append((order[delta.source], f"tensor {table.file_name(delta.source)} is for "
                                                  f"{official(delta.target)}, which the expert {expert} does not have"))
        elif tuple(got) != tuple(target):
            problems.append((order[delta.source], f"tensor {table.file_name(delta.source)} is {list(got)}, but the "
                                                  f"expert {expert} has {official(delta.target)} {list(target)}"))
    if not problems:
        return None
    return f"{info.path}: does not fit (a LoRA for another model?): {min(problems)[1]}"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_lora(path: str | Path, shapes: Mapping[str, tuple[int, ...]], expert: str | Path) -> LoraTable:
    """Recognise a LoRA file and check it against an expert's shapes; LoraError if it does not fit."""
    table = lora_table(inspect_lora(path))
    if not table.pairs and not table.deltas:
        raise LoraError(f"{path}: holds nothing for a Wan2.2 expert (only {len(table.skipped)} tensors of Wan2.1's "
                        "CLIP image branch)")
    problem = fit_problem(table, shapes, expert)
    if problem:
        raise LoraError(problem)
    return table


# --------------------------------------------------------------------------- merge


def read_tensors(info: LoraInfo, canonical: Iterable[str]) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """{canonical name: CPU tensor} of a LoRA file (safetensors read with pread; .pth memory-mapped)."""
    wanted = {name: info.names[name] for name in canonical}
    if info.container == "pth":
        tensors = load_pth(info.path)
        return {name: tensors[key] for name, key in wanted.items()}
    from safetensors import safe_open

    with safe_open(str(info.path), framework="pt", backend="pread") as f:
        return {name: f.get_tensor(key) for name, key in wanted.items()}


def default_alpha(info: LoraInfo, target: str, rank: int) -> float:
    """A pair's alpha when the file has no alpha tensor for it: a diffusers file's adapter metadata
    (`transformer.lora_alpha`, `transformer.alpha_pattern`), else the rank (scale alpha / rank = 1)."""
    meta = info.metadata
    pattern = meta.get("transformer.alpha_pattern") or {}
    for key, value in pattern.items():
        if target == key or target.endswith(f".{key}") or (re.fullmatch(key, target) if _is_regex(key) else False):
            return float(value)
    if meta.get("transformer.lora_alpha") is not None:
        return float(meta["transformer.lora_alpha"])
    return float(rank)


def _is_regex(text: str) -> bool:
    try:
        re.compile(text)
    except re.error:
        return False
    return True


def pair_delta(a: "torch.Tensor", b: "torch.Tensor", factor: float, device) -> "torch.Tensor":  # noqa: F821
    """factor * (B @ A) in float32 on `device`."""
    import torch

    return factor * (b.to(device=device, dtype=torch.float32) @ a.to(device=device, dtype=torch.float32))


def merged(weight: "torch.Tensor", delta: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """fp32(weight) + delta, back in the weight's dtype."""
    return (weight.float() + delta).to(weight.dtype)


def merged_int8(q: "torch.Tensor", scale: "torch.Tensor", delta: "torch.Tensor"):  # noqa: F821
    """A blockwise-int8 weight plus a delta: dequantise to fp32, add, requantise (new block scales)."""
    import torch

    from .int8 import dequantize_blockwise, quantize_blockwise

    return quantize_blockwise(dequantize_blockwise(q, scale, torch.float32) + delta)


def merge_lora(state: dict, table: LoraTable, scale: float, int8_modules: set[str] | frozenset[str] = frozenset(),
               tensors: Mapping[str, "torch.Tensor"] | None = None) -> int:  # noqa: F821
    """Merge one LoRA at `scale` into an expert's state dict (diffusers names, tensors on their device),
    in place; returns the number of tensors changed. The fit must have been checked."""
    import torch

    if scale == 0:
        return 0
    info = table.info
    if tensors is None:
        needed = {n for p in table.pairs for n in (p.down, p.up, p.alpha) if n} | {d.source for d in table.deltas}
        tensors = read_tensors(info, needed)

    def add(target_weight: str, delta_for: Callable[[torch.device], torch.Tensor]) -> None:
        module = target_weight.rsplit(".", 1)[0]
        if target_weight.endswith(".weight") and module in int8_modules:
            q, s = state[f"{module}.int8_weight"], state[f"{module}.scale"]
            state[f"{module}.int8_weight"], state[f"{module}.scale"] = merged_int8(q, s, delta_for(q.device))
        else:
            weight = state[target_weight]
            state[target_weight] = merged(weight, delta_for(weight.device))

    for pair in table.pairs:
        a, b = tensors[pair.down], tensors[pair.up]
        rank = a.shape[0]
        alpha = float(tensors[pair.alpha].float().item()) if pair.alpha else default_alpha(info, pair.target, rank)
        factor = scale * alpha / rank
        add(f"{pair.target}.weight", lambda device, a=a, b=b, factor=factor: pair_delta(a, b, factor, device))
    for delta in table.deltas:
        source = tensors[delta.source]
        add(delta.target, lambda device, source=source: scale * source.to(device=device, dtype=torch.float32))
    return len(table.pairs) + len(table.deltas)


def merge_loras(state: dict, loras: Sequence[tuple[str, float]], expert: str | Path,
                int8_modules: set[str] | frozenset[str] = frozenset()) -> None:
    """Merge each (LoRA file, scale) into the state dict in turn (scale 0: skipped). LoraError naming
    the LoRA file and its first tensor that does not fit the expert."""
    shapes = None
    for path, scale in loras:
        if float(scale) == 0:
            continue
        started = time.perf_counter()
        if shapes is None:
            shapes = state_shapes(state)
        table = check_lora(path, shapes, expert)
        if table.skipped:
            log.warning("%s: %d tensors of Wan2.1's CLIP image branch skipped (Wan2.2's experts have none)",
                        path, len(table.skipped))
        changed = merge_lora(state, table, float(scale), int8_modules)
        log.info("merged LoRA %s: %s at scale %g into %d tensors%s in %.1f s", path, table.info.describe(),
                 float(scale), changed, " (int8 layers requantised)" if int8_modules else "",
                 time.perf_counter() - started)
