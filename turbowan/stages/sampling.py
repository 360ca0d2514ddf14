"""sample_high and sample_low: the rCM loop split between the two experts, one job each.

sample_high starts a row's sampling and runs the steps whose time is at or above the row's
boundary; it saves everything the loop carries (x in float64, the generator's state, the next
step). sample_low restores that and runs the rest, so the two jobs together give the
single-process loop's result bit for bit (docs/reference.md, "The sampler").
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from ..files.artifacts import ArtifactError, check_made_from, load_artifact, save_artifact
from ..files.loras import lora_digest
from ..progress import phase
from ..wan.compiled import compile_wanted
from ..wan.devices import resolve_device, resolve_dtype
from ..wan.sampler import SamplerState, dit_velocity, initial_state, restore_generator, run_steps
from ..wan.schedule import num_high_steps, rcm_timesteps
from ..wan.sizes import latent_shape, video_values
from ..wan.text import TEXT_LEN
from . import loading
from .context import StageContext

log = logging.getLogger(__name__)


def sampling_values(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The per-row values that determine a row's sampling, typed; recorded in its boundary and latent."""
    return {"seed": int(sampling["seed"]), "num_steps": int(sampling["num_steps"]),
            "sigma_max": float(sampling["sigma_max"]), "boundary": float(sampling["boundary"]),
            "ode": bool(sampling["ode"])}


def lora_values(sampling: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The row's LoRAs for this stage's expert, in merge order: [{name, file, scale}] (scale 0 left
    out: it merges nothing). rules/common.smk puts them in `sampling` only for rows that have some,
    so the parameters of a row without LoRAs are what they always were."""
    return [{"name": str(lora["name"]), "file": str(lora["file"]), "scale": float(lora["scale"])}
            for lora in sampling.get("loras", ()) if float(lora["scale"]) != 0]


def _conditions(text: str, cond: str, video: dict[str, int], device: torch.device):
    """Text embedding [1, 512, D] and y [1, 20, lat_t, lat_h, lat_w], checked against this row."""
    _, _, lat_t, lat_h, lat_w = latent_shape(**video)
    text_t, _ = load_artifact(text, "encode_prompt", {"text": ((1, TEXT_LEN, None), torch.bfloat16)}, device=device)
    cond_t, _ = load_artifact(cond, "encode_image", {"y": ((1, 20, lat_t, lat_h, lat_w), torch.bfloat16)},
                              params=video, device=device)
    return text_t["text"], cond_t["y"]


def _check_text_width(model, text: torch.Tensor, text_path: str, expert: str) -> None:
    expected = model.config.text_dim
    if text.shape[-1] != expected:
        raise ArtifactError(
            f"{text_path}: text embedding is {text.shape[-1]} wide but expert {expert} expects {expected}; "
            "the text encoder does not belong to this model (Wan2.2 needs umT5-XXL, not CLIP)"
        )


class _Expert:
    """One expert as a job configured it: loads through the context's cache on first use."""

    def __init__(self, ctx: StageContext, path: str, device: torch.device, dtype: str, attention: str,
                 sla_topk: float, activation_slices: int | str, compile: bool | str,
                 loras: list[dict[str, Any]] | None = None):
        self.ctx, self.path, self.device, self.dtype = ctx, path, device, dtype
        self.options = (attention, sla_topk, activation_slices, compile)
        self.loras = [(lora["file"], lora["scale"]) for lora in loras or ()]
        # what the artifact records of the expert's set-up (and of its LoRAs, when it has any: their
        # files' digests and scales)
        self.params = {"attention": attention, "sla_topk": float(sla_topk), "compile": compile_wanted(compile, device),
                       "dtype": dtype, "device_type": device.type}
        if loras:
            self.params["loras"] = [{**lora, "sha256": lora_digest(lora["file"])} for lora in loras]

    def run(self, name: str, state: SamplerState, t: torch.Tensor, stop: int, ode: bool, text: str,
            text_emb: torch.Tensor, y: torch.Tensor) -> SamplerState:
        """Steps state.next_step .. stop-1 of one row."""
        model = loading.expert(self.ctx, self.path, self.device, self.dtype, *self.options, loras=self.loras)
        if model.kernels_fallback:  # (the summary looks for this line in every row's log)
            log.warning("kernels: plain-torch fallback on cuda (%s)", model.kernels_fallback)
        _check_text_width(model, text_emb, text, self.path)
        velocity = dit_velocity(model, text_emb, y, resolve_dtype(self.dtype))
        return run_steps(state, velocity, t, stop, ode, name, before_step=self.ctx.check)


def sample_high(text: str, cond: str, expert: str, out: str, sampling: Mapping[str, Any],
                video: Mapping[str, Any], device: str = "auto", dtype: str = "bfloat16", attention: str = "auto",
                sla_topk: float = 0.1, activation_slices: int | str = "auto", compile: bool | str = False,
        *, ctx: StageContext | None = None) -> None:
    """Start a row's sampling and run its high-noise steps; save x, the generator and the next step."""
    ctx = StageContext() if ctx is None else ctx
    dev = resolve_device(device)
    loras = lora_values(sampling)
    sampling, video = sampling_values(sampling), video_values(video)
    high = _Expert(ctx, expert, dev, dtype, attention, sla_topk, activation_slices, compile, loras)
    t = rcm_timesteps(sampling["num_steps"], sampling["sigma_max"])
    n_high = num_high_steps(t, sampling["boundary"])
    text_emb, y = _conditions(text, cond, video, dev)
    state = initial_state(latent_shape(**video), sampling["seed"], t, dev)
    if n_high:
        state = high.run("high", state, t, n_high, sampling["ode"], text, text_emb, y)
    ctx.check()
    with phase("save boundary"):
        save_artifact(
            out,
            {
                "x": state.x,  # float64 [1, 16, lat_t, lat_h, lat_w]
                "generator_state": state.generator.get_state(),
                "next_step": torch.tensor([state.next_step], dtype=torch.int64),
            },
            stage="sample_high", params={**sampling, **video, **high.params},
            inputs={"text": text, "cond": cond, "expert": expert},
        )


def sample_low(text: str, cond: str, boundary: str, expert: str, out: str,
               sampling: Mapping[str, Any], video: Mapping[str, Any], device: str = "auto", dtype: str = "bfloat16",
               attention: str = "auto", sla_topk: float = 0.1, activation_slices: int | str = "auto",
               compile: bool | str = False,
        *, ctx: StageContext | None = None) -> None:
    """Restore the state sample_high saved and run the remaining (low-noise) steps."""
    ctx = StageContext() if ctx is None else ctx
    dev = resolve_device(device)
    loras = lora_values(sampling)
    sampling, video = sampling_values(sampling), video_values(video)
    low = _Expert(ctx, expert, dev, dtype, attention, sla_topk, activation_slices, compile, loras)
    saved, record = load_artifact(
        boundary, "sample_high",
        {"x": (latent_shape(**video), torch.float64), "generator_state": ((None,), torch.uint8),
         "next_step": ((1,), torch.int64)},
        params={**sampling, **video, "device_type": dev.type},
    )
    check_made_from(boundary, record, "text", text)
    check_made_from(boundary, record, "cond", cond)
    state = SamplerState(x=saved["x"].to(dev), generator=restore_generator(saved["generator_state"], dev),
                         next_step=int(saved["next_step"].item()))
    t = rcm_timesteps(sampling["num_steps"], sampling["sigma_max"])
    if state.next_step < sampling["num_steps"]:
        text_emb, y = _conditions(text, cond, video, dev)
        state = low.run("low", state, t, sampling["num_steps"], sampling["ode"], text, text_emb, y)
    else:
        log.info("all %d steps ran on the high-noise expert; the low-noise expert is not needed", sampling["num_steps"])
    ctx.check()
    save_artifact(out, {"x": state.x}, stage="sample_low", params={**sampling, **video, **low.params},
                  inputs={"boundary": boundary, "expert": expert})
