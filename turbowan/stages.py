"""One function per pipeline stage: read artifacts, check them, compute, write the next artifact.

These are what the Snakemake scripts call; they take plain paths and values, so tests and other
drivers can call them without Snakemake.
"""

from __future__ import annotations

import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .files.artifacts import ArtifactError, check_made_from, fingerprint, load_artifact, save_artifact
from .batch import Lookahead, RowTask, run_group, store_entry
from .wan.compiled import compile_wanted
from .wan.devices import release, resolve_device, resolve_dtype
from .wan.image import open_rgb, preprocess
from .wan.models import load_text_encoder, load_tokenizer, load_transformer, load_vae
from .mp4 import mp4_into_store
from .progress import phase
from .wan.sampler import SamplerState, dit_velocity, initial_state, restore_generator, run_steps
from .wan.schedule import num_high_steps, rcm_timesteps
from .wan.sizes import latent_shape, video_values
from .wan.text import TEXT_LEN, encode_text
from .wan.vae import decode_frames, encode_condition
from .files.video import save_frames

log = logging.getLogger(__name__)

# The per-row values that determine a row's sampling, recorded in its boundary and latent files.
SAMPLING_KEYS = ("seed", "num_steps", "sigma_max", "boundary", "ode")


def _sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "seed": int(sampling["seed"]),
        "num_steps": int(sampling["num_steps"]),
        "sigma_max": float(sampling["sigma_max"]),
        "boundary": float(sampling["boundary"]),
        "ode": bool(sampling["ode"]),
    }


class Lazy:
    """A model loaded the first time a row needs it: a group whose rows are all in the store loads nothing."""

    def __init__(self, load: Callable[[], Any]):
        self._load, self._value = load, None

    def __call__(self) -> Any:
        if self._value is None:
            self._value = self._load()
        return self._value

    def drop(self) -> None:
        self._value = None


# --- encode_prompt: prompt text -> umT5 embedding -----------------------------------------------

def encode_prompts(
    rows: list[Mapping[str, Any]], text_encoder: str, tokenizer: str, device: str = "auto",
    dtype: str = "bfloat16", store: str | None = None, job_log: str | None = None,
) -> None:
    """rows: [{key, prompt, out}]; umT5 is loaded once for the group and freed at the end."""
    dev = resolve_device(device)

    def load():
        with phase("load text encoder"):
            return load_text_encoder(text_encoder, dev, resolve_dtype(dtype)), load_tokenizer(tokenizer)

    models = Lazy(load)
    inputs = {"text_encoder": text_encoder, "tokenizer": tokenizer}

    def compute(task: RowTask, path: Path) -> None:
        encoder, tok = models()
        with phase("encode prompt"):
            emb, length = encode_text(encoder, tok, task.params["prompt"], dev)
        log.info("prompt encoded: %d tokens (of %d), embedding %s", length, TEXT_LEN, list(emb.shape))
        save_artifact(path, {"text": emb, "length": torch.tensor([length], dtype=torch.int64)},
                      stage="encode_prompt", params=task.params, inputs=task.inputs)

    params = {"text_len": TEXT_LEN, "dtype": dtype, "device_type": dev.type}
    tasks = [RowTask(row["key"], row["out"], {"prompt": row["prompt"], **params}, inputs) for row in rows]
    run_group("encode_prompt", tasks, compute, store, job_log)
    models.drop()
    gc.collect()
    release(dev)  # umT5 (11 GB) leaves the GPU before anything else runs there


def encode_prompt(
    prompt: str, text_encoder: str, tokenizer: str, out: str, device: str = "auto", dtype: str = "bfloat16"
) -> None:
    encode_prompts([{"key": "prompt", "prompt": prompt, "out": out}], text_encoder, tokenizer, device, dtype)


# --- the VAE stages: image -> y, latent -> frames --------------------------------------------------

# GPU memory the VAE needs per output pixel of one frame, measured at 480p in bf16 on an H100
# (decode of 832x480: 4.6 GB peak, about 11 KB per pixel); used to turn tiling on before a row runs
# out of memory rather than after.
VAE_BYTES_PER_PIXEL = 11_000


def _load_vae(vae: str, dev: torch.device, vae_dtype: str):
    """The VAE in `vae_dtype` ('auto': bfloat16 on a GPU, float32 on a CPU, where bf16 convs are slow)."""
    if vae_dtype == "auto":
        vae_dtype = "bfloat16" if dev.type == "cuda" else "float32"
    with phase("load VAE"):
        return load_vae(vae, dev, resolve_dtype(vae_dtype))


def _tiling_wanted(dev: torch.device, video: Mapping[str, int], frugal: int) -> bool:
    """Tile when asked to save memory (a retry), or when the frame size needs more than the GPU has free."""
    if frugal:
        return True
    if dev.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(dev)
    return VAE_BYTES_PER_PIXEL * video["width"] * video["height"] > 0.9 * free


def _with_vae(model_of: Lazy, dev: torch.device, video: Mapping[str, int], frugal: int, work: Callable[[Any], Any],
              key: str):
    """Run `work(vae)` for row `key`, with tiling when the memory needs it; after running out of GPU
    memory, once more with tiling."""
    model = model_of()
    tiled = _tiling_wanted(dev, video, frugal)
    (model.enable_tiling if tiled else model.disable_tiling)()
    if tiled:
        log.info("row %s: VAE tiling on (%s)", key,
                 "a retry, to use less memory" if frugal else "the frame size needs it")
    try:
        return work(model)
    except torch.OutOfMemoryError:
        if tiled:
            raise
        log.warning("row %s: out of GPU memory; once more with VAE tiling on", key)
        gc.collect()
        release(dev)
        model.enable_tiling()
        return work(model)


def _vae_task(row: Mapping[str, Any], inputs: dict[str, str], vae_dtype: str, dev: torch.device) -> RowTask:
    video = video_values(row["video"])
    params = {**video, "vae_dtype": vae_dtype, "device_type": dev.type}
    return RowTask(row["key"], row["out"], params, inputs, {"video": video})


def encode_images(
    rows: list[Mapping[str, Any]], vae: str, device: str = "auto", vae_dtype: str = "auto", frugal: int = 0,
    store: str | None = None, job_log: str | None = None,
) -> None:
    """rows: [{key, image, video, out}] -> each row's conditioning y."""
    dev = resolve_device(device)
    model = Lazy(lambda: _load_vae(vae, dev, vae_dtype))

    def compute(task: RowTask, path: Path) -> None:
        video = task.values["video"]
        pixels = preprocess(open_rgb(task.inputs["image"]), video["width"], video["height"])  # [1, 3, H, W]
        model()  # (loaded with the first row, outside its timing)
        with phase("VAE encode"):
            y = _with_vae(model, dev, video, frugal, lambda m: encode_condition(m, pixels, video["num_frames"]),
                          task.key)
        log.info("image %s -> y %s", task.inputs["image"], list(y.shape))
        save_artifact(path, {"y": y}, stage="encode_image", params=task.params, inputs=task.inputs)

    tasks = [_vae_task(row, {"image": row["image"], "vae": vae}, vae_dtype, dev) for row in rows]
    run_group("encode_image", tasks, compute, store, job_log)


def encode_image(
    image: str, vae: str, out: str, video: Mapping[str, Any], device: str = "auto", vae_dtype: str = "auto",
    frugal: int = 0,
) -> None:
    encode_images([{"key": "image", "image": image, "video": video, "out": out}], vae, device, vae_dtype, frugal)


def decode_latents(
    rows: list[Mapping[str, Any]], vae: str, device: str = "auto", vae_dtype: str = "auto", frugal: int = 0,
    store: str | None = None, job_log: str | None = None, mp4: Mapping[str, int] | None = None,
) -> None:
    """rows: [{key, latent, video, out}] -> each row's frames folder (lossless PNG).

    The GPU decodes on a second thread a row ahead, while this one writes the frames of the row
    before (1 s a row at 720p). mp4 ({fps, quality}, with a store): the CPU also makes each row's
    mp4 into the store, two at a time (one takes 5-7 s at 720p beside the decoding, more than a
    row's decode), where that row's encode_video job then finds it. The group's last row is
    left to its encode_video job, which runs beside the next GPU job instead of keeping this one
    (and its card) waiting.
    """
    dev = resolve_device(device)
    model = Lazy(lambda: _load_vae(vae, dev, vae_dtype))

    def decode_row(task: RowTask) -> tuple[torch.Tensor, float]:
        """(on the decode thread) uint8 frames [F, H, W, 3] and the seconds they took (the VAE's
        load, with the first row, not counted)"""
        model()
        started = time.perf_counter()
        video, latent = task.values["video"], task.inputs["latent"]
        saved, _ = load_artifact(latent, "sample_low", {"x": (latent_shape(**video), torch.float64)}, params=video)
        frames = _with_vae(model, dev, video, frugal, lambda m: decode_frames(m, saved["x"]), task.key)
        expected = (video["num_frames"], video["height"], video["width"], 3)
        if tuple(frames.shape) != expected:
            raise ArtifactError(f"{latent}: decoded to {list(frames.shape)}, expected {list(expected)}")
        return frames, time.perf_counter() - started

    tasks = [_vae_task(row, {"latent": row["latent"], "vae": vae}, vae_dtype, dev) for row in rows]
    def not_stored(task: RowTask) -> bool:
        return store is None or not store_entry(store, "decode", task).exists()

    with (ThreadPoolExecutor(1, thread_name_prefix="decode") as gpu,
          ThreadPoolExecutor(2, thread_name_prefix="mp4") as cpu):
        ahead = Lookahead(gpu, decode_row, tasks, needed=not_stored)

        def compute(task: RowTask, path: Path) -> None:
            frames, seconds = ahead.result(task)
            log.info("VAE decode: %.2f s", seconds)
            started = time.perf_counter()
            save_frames(frames, path, {"latent": fingerprint(task.inputs["latent"]), "vae": fingerprint(vae),
                                       "params": task.params})
            log.info("write frames: %.2f s", time.perf_counter() - started)

        def make_mp4_early(task: RowTask) -> None:
            if mp4 and store and task is not tasks[-1]:
                cpu.submit(mp4_into_store, task.out, task.values["video"], mp4["fps"], mp4["quality"], store)

        run_group("decode", tasks, compute, store, job_log, make_mp4_early)


def decode(
    latent: str, vae: str, out_dir: str, video: Mapping[str, Any], device: str = "auto", vae_dtype: str = "auto",
    frugal: int = 0,
) -> None:
    decode_latents([{"key": "latent", "latent": latent, "video": video, "out": out_dir}], vae, device, vae_dtype, frugal)


# --- sampling: one expert per job --------------------------------------------------------------------

def _load_conditions(text: str, cond: str, video: dict[str, int], device: torch.device):
    """Text embedding [1, 512, D] and y [1, 20, lat_t, lat_h, lat_w], checked against this row."""
    _, _, lat_t, lat_h, lat_w = latent_shape(**video)
    text_t, _ = load_artifact(text, "encode_prompt", {"text": ((1, TEXT_LEN, None), torch.bfloat16)}, device=device)
    cond_t, _ = load_artifact(
        cond, "encode_image", {"y": ((1, 20, lat_t, lat_h, lat_w), torch.bfloat16)}, params=video, device=device
    )
    return text_t["text"], cond_t["y"]


def _check_text_width(model, text: torch.Tensor, text_path: str, expert: str) -> None:
    expected = model.config.text_dim
    if text.shape[-1] != expected:
        raise ArtifactError(
            f"{text_path}: text embedding is {text.shape[-1]} wide but expert {expert} expects {expected}; "
            "the text encoder does not belong to this model (Wan2.2 needs umT5-XXL, not CLIP)"
        )


def _expert(expert: str, dev: torch.device, dtype: str, attn: dict, activation_slices: int | str) -> Lazy:
    """attn: attention, sla_topk and compile (turbowan.wan.compiled.compile_wanted, resolved)."""
    def load():
        with phase("load expert"):
            return load_transformer(expert, dev, resolve_dtype(dtype), **attn, activation_slices=activation_slices)

    return Lazy(load)


def _run_expert(model: Lazy, expert: str, name: str, state: SamplerState, t: torch.Tensor, stop: int, ode: bool,
                text: str, text_emb: torch.Tensor, y: torch.Tensor, dtype: str) -> SamplerState:
    """Run the steps state.next_step .. stop-1 of one row with the group's expert."""
    transformer = model()
    _check_text_width(transformer, text_emb, text, expert)
    return run_steps(state, dit_velocity(transformer, text_emb, y, resolve_dtype(dtype)), t, stop, ode, name)


def _sampling_task(
    row: Mapping[str, Any], attn: dict, dtype: str, dev: torch.device, inputs: dict[str, str]
) -> RowTask:
    sampling, video = _sampling(row["sampling"]), video_values(row["video"])
    params = {**sampling, **video, **attn, "dtype": dtype, "device_type": dev.type}
    return RowTask(row["key"], row["out"], params, inputs, {"sampling": sampling, "video": video})


def sample_high_rows(
    rows: list[Mapping[str, Any]], expert: str, device: str = "auto", dtype: str = "bfloat16",
    attention: str = "auto", sla_topk: float = 0.1, store: str | None = None, job_log: str | None = None,
    activation_slices: int | str = "auto", compile: bool | str = False,
) -> None:
    """rows: [{key, text, cond, sampling, video, out}]. Start each row's sampling and run its
    high-noise steps; save x, the generator and the next step."""
    dev = resolve_device(device)
    attn = {"attention": attention, "sla_topk": float(sla_topk), "compile": compile_wanted(compile, dev)}
    model = _expert(expert, dev, dtype, attn, activation_slices)

    def compute(task: RowTask, path: Path) -> None:
        sampling, video = task.values["sampling"], task.values["video"]
        t = rcm_timesteps(sampling["num_steps"], sampling["sigma_max"])
        n_high = num_high_steps(t, sampling["boundary"])
        text_emb, y = _load_conditions(task.inputs["text"], task.inputs["cond"], video, dev)
        state = initial_state(latent_shape(**video), sampling["seed"], t, dev)
        if n_high:
            state = _run_expert(model, expert, "high", state, t, n_high, sampling["ode"], task.inputs["text"],
                                text_emb, y, dtype)
        with phase("save boundary"):
            save_artifact(
                path,
                {
                    "x": state.x,  # float64 [1, 16, lat_t, lat_h, lat_w]
                    "generator_state": state.generator.get_state(),
                    "next_step": torch.tensor([state.next_step], dtype=torch.int64),
                },
                stage="sample_high", params=task.params, inputs=task.inputs,
            )

    tasks = [_sampling_task(row, attn, dtype, dev, {"text": row["text"], "cond": row["cond"], "expert": expert})
             for row in rows]
    run_group("sample_high", tasks, compute, store, job_log)


def sample_low_rows(
    rows: list[Mapping[str, Any]], expert: str, device: str = "auto", dtype: str = "bfloat16",
    attention: str = "auto", sla_topk: float = 0.1, store: str | None = None, job_log: str | None = None,
    activation_slices: int | str = "auto", compile: bool | str = False,
) -> None:
    """rows: [{key, text, cond, boundary, sampling, video, out}]. Restore the state saved by
    sample_high and run the remaining (low-noise) steps."""
    dev = resolve_device(device)
    attn = {"attention": attention, "sla_topk": float(sla_topk), "compile": compile_wanted(compile, dev)}
    model = _expert(expert, dev, dtype, attn, activation_slices)

    def compute(task: RowTask, path: Path) -> None:
        sampling, video = task.values["sampling"], task.values["video"]
        boundary, text, cond = task.inputs["boundary"], task.values["text"], task.values["cond"]
        saved, record = load_artifact(
            boundary, "sample_high",
            {"x": (latent_shape(**video), torch.float64), "generator_state": ((None,), torch.uint8),
             "next_step": ((1,), torch.int64)},
            params={**sampling, **video, "device_type": dev.type},
        )
        check_made_from(boundary, record, "text", text)
        check_made_from(boundary, record, "cond", cond)
        state = SamplerState(
            x=saved["x"].to(dev), generator=restore_generator(saved["generator_state"], dev),
            next_step=int(saved["next_step"].item()),
        )
        t = rcm_timesteps(sampling["num_steps"], sampling["sigma_max"])
        if state.next_step < sampling["num_steps"]:
            text_emb, y = _load_conditions(text, cond, video, dev)
            state = _run_expert(model, expert, "low", state, t, sampling["num_steps"], sampling["ode"], text,
                                text_emb, y, dtype)
        else:
            log.info("all %d steps ran on the high-noise expert; the low-noise expert is not needed",
                     sampling["num_steps"])
        save_artifact(path, {"x": state.x}, stage="sample_low", params=task.params, inputs=task.inputs)

    tasks = []
    for row in rows:
        task = _sampling_task(row, attn, dtype, dev, {"boundary": row["boundary"], "expert": expert})
        task.values.update(text=row["text"], cond=row["cond"])
        tasks.append(task)
    run_group("sample_low", tasks, compute, store, job_log)


def sample_high(
    text: str, cond: str, expert: str, out: str, sampling: Mapping[str, Any], video: Mapping[str, Any],
    device: str = "auto", dtype: str = "bfloat16", attention: str = "auto", sla_topk: float = 0.1,
) -> None:
    row = {"key": "row", "text": text, "cond": cond, "sampling": sampling, "video": video, "out": out}
    sample_high_rows([row], expert, device, dtype, attention, sla_topk)


def sample_low(
    text: str, cond: str, boundary: str, expert: str, out: str, sampling: Mapping[str, Any],
    video: Mapping[str, Any], device: str = "auto", dtype: str = "bfloat16", attention: str = "auto",
    sla_topk: float = 0.1,
) -> None:
    row = {"key": "row", "text": text, "cond": cond, "boundary": boundary, "sampling": sampling, "video": video,
           "out": out}
    sample_low_rows([row], expert, device, dtype, attention, sla_topk)
